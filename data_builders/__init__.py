"""TFDS builders of puseg_jax. Importing this package registers every builder with TFDS."""
