"""TFDS builders of puseg_jax. Importing this package registers every builder with TFDS."""

from data_builders.fundus import fundus as _fundus  # noqa: F401
from data_builders.prostate import prostate as _prostate  # noqa: F401
from data_builders.synthetic import synthetic as _synthetic  # noqa: F401
