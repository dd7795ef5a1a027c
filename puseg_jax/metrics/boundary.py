"""Bands around mask boundaries (pixels near a ground-truth edge, on both sides)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from puseg_jax.metrics.overlap import _as_bool
from puseg_jax.metrics.surface import _bounding_box


def _slice_band(gt: np.ndarray, width: float) -> np.ndarray:
    band = np.zeros(gt.shape, dtype=bool)
    if gt.all() or not gt.any():
        return band  # no boundary inside the image
    # Nothing farther than `width` from the foreground can be in the band.
    box = _bounding_box(gt, margin=int(np.ceil(width)))
    gt = gt[box]
    # The EDT of a mask gives each foreground pixel its distance to the nearest background
    # pixel, and the EDT of its complement the reverse, hence the two sides of the band.
    inside = ndimage.distance_transform_edt(gt) <= width
    outside = ndimage.distance_transform_edt(~gt) <= width
    band[box] = np.where(gt, inside, outside)
    return band


def boundary_band(gt_mask: np.ndarray, width: float = 2) -> np.ndarray:
    """Pixels within `width` pixels of the boundary of a ground-truth mask, on both sides.

    A pixel is in the band when a pixel of the other class (foreground vs background) lies
    within Euclidean distance `width`, centre to centre, in the same 2-D image. With width 1
    that is every pixel with a 4-neighbour of the other class; with width 2 it also takes the
    diagonal neighbours and those two pixels away. Pixels beyond the image do not count, so an
    all-background or all-foreground image has no band.

    Args:
      gt_mask: (H, W), or (N, H, W) / (D, H, W) treated as independent 2-D slices along the
        first axis (in-plane bands; pixels and slice spacing ignored). Non-zero is foreground.
      width: half-width of the band in pixels.

    Returns:
      Boolean mask of the input shape.
    """
    gt_mask = _as_bool(gt_mask)
    if gt_mask.ndim == 2:
        return _slice_band(gt_mask, width)
    if gt_mask.ndim != 3:
        raise ValueError(f"expected (H, W) or (N, H, W) masks, got shape {gt_mask.shape}")
    return np.stack([_slice_band(image, width) for image in gt_mask])
