"""Overlap of binary masks: Dice and the largest connected component."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# ---------------------------------------------------------------------------------------------
# Per-case overlap and surface metrics.
# ---------------------------------------------------------------------------------------------


def _as_bool(mask: np.ndarray) -> np.ndarray:
    """Non-zero means foreground, as in medpy."""
    return np.asarray(mask).astype(bool, copy=False)


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = _as_bool(pred), _as_bool(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {pred.shape} vs {gt.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"expected a (H, W) or (D, H, W) mask, got shape {pred.shape}")
    return pred, gt


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    denominator = np.count_nonzero(pred) + np.count_nonzero(gt)
    if denominator == 0:
        return 1.0
    return 2.0 * np.count_nonzero(pred & gt) / denominator


def compute_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient ``2 |P & G| / (|P| + |G|)`` of two binary masks of any shape.

    Args:
      pred: predicted mask; non-zero is foreground.
      gt: ground-truth mask of the same shape.

    Returns:
      Dice in [0, 1]; 1 when both masks are empty (see the module's empty-mask convention),
      where medpy's ``dc`` would return 0.
    """
    pred, gt = _as_bool(pred), _as_bool(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {pred.shape} vs {gt.shape}")
    return float(_dice(pred, gt))


# ---------------------------------------------------------------------------------------------
# Post-processing.
# ---------------------------------------------------------------------------------------------


def largest_connected_component(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Keeps only the largest connected component of a 2-D or 3-D binary mask.

    Args:
      mask: (H, W) or (D, H, W) mask; non-zero is foreground. A 3-D mask is one volume, its
        components connected across slices.
      connectivity: neighbours that connect voxels (1 = sharing a face, as in
        ``scipy.ndimage.label``'s default; ndim = also sharing an edge or corner).

    Returns:
      Boolean mask of the same shape. An empty mask stays empty; among components of equal
      size the first in raster order is kept, so the result is deterministic.
    """
    mask = _as_bool(mask)
    if mask.ndim not in (2, 3):
        raise ValueError(f"expected a (H, W) or (D, H, W) mask, got shape {mask.shape}")
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    labels, num_components = ndimage.label(mask, structure=structure)
    if num_components <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0  # background is not a component
    # argmax returns the first maximum; labels are assigned in raster order.
    return labels == np.argmax(sizes)
