"""puseg_jax: generalisable medical image segmentation with pixel-wise uncertainty estimation."""

__version__ = "0.1.0"
