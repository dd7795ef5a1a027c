"""Embedded synthetic multi-domain datasets: a NumPy generator and the TFDS builders over it.

Importing this package registers `synth_fundus` and `synth_prostate` with TFDS.
"""

from data_builders.synthetic.generator import (
    FUNDUS_DOMAINS,
    PROSTATE_SITES,
    FundusDomain,
    ProstateSite,
    generate_fundus,
    generate_prostate_volume,
)
from data_builders.synthetic.synthetic import (
    SynthFundus,
    SynthFundusConfig,
    SynthProstate,
    SynthProstateConfig,
)

__all__ = [
    "FUNDUS_DOMAINS",
    "PROSTATE_SITES",
    "FundusDomain",
    "ProstateSite",
    "SynthFundus",
    "SynthFundusConfig",
    "SynthProstate",
    "SynthProstateConfig",
    "generate_fundus",
    "generate_prostate_volume",
]
