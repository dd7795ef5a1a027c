"""Bands around mask boundaries and the uncertainty ratio between band and interior."""

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


def boundary_uncertainty_ratio(
    u: np.ndarray,
    gt: np.ndarray,
    width: float = 2,
) -> tuple[float, float, float]:
    """How much more uncertain a model is near the ground-truth boundary than elsewhere.

    Args:
      u: pixel-wise uncertainty (e.g. entropy or variance), same shape as `gt`.
      gt: ground-truth mask, (H, W) or (N, H, W) / (D, H, W) (bands per 2-D slice, see
        ``boundary_band``).
      width: half-width of the band in pixels.

    Returns:
      (mean of `u` in the band, mean of `u` elsewhere, their ratio). A mean over no pixels is
      NaN; the ratio follows IEEE division (inf when only the mean elsewhere is 0).
    """
    u = np.asarray(u, dtype=np.float64)
    if u.shape != np.shape(gt):
        raise ValueError(f"u and gt shapes differ: {u.shape} vs {np.shape(gt)}")
    band = boundary_band(gt, width)
    in_band, rest = u[band], u[~band]
    mean_band = float(in_band.mean()) if in_band.size else float("nan")
    mean_rest = float(rest.mean()) if rest.size else float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(np.float64(mean_band) / np.float64(mean_rest))
    return mean_band, mean_rest, ratio
