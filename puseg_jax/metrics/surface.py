"""Surface distances (HD95, ASD) with the empty-mask convention, per case and per slice,
and their summaries over cases."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from puseg_jax.metrics.overlap import _check_pair, _dice, compute_dice


def _spacing_array(spacing: Sequence[float] | None, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim, dtype=np.float64)
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (ndim,):
        raise ValueError(f"spacing must have one value per axis ({ndim}), got {spacing.tolist()}")
    if not np.all(spacing > 0):
        raise ValueError(f"spacing must be positive, got {spacing.tolist()}")
    return spacing


def _axis_profiles(mask: np.ndarray) -> list[np.ndarray]:
    """For each axis, whether any voxel is set at each index along it."""
    if mask.ndim == 1:
        return [mask]
    # Reducing over trailing axes, then over the leading one, keeps every reduction on
    # contiguous memory (~30x faster on a 384x384x24 volume than np.any over all axes but one).
    leading = np.any(mask, axis=tuple(range(1, mask.ndim)))
    return [leading, *_axis_profiles(np.any(mask, axis=0))]


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every set voxel, grown by `margin` and clipped to the
    array; None for an empty mask."""
    box = []
    for profile, size in zip(_axis_profiles(mask), mask.shape, strict=True):
        hits = np.flatnonzero(profile)
        if hits.size == 0:
            return None
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, size)))
    return tuple(box)


def _crop_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Both masks cut to the bounding box of their union grown by one voxel; None if both are
    empty. Nothing outside the box is set, so overlap counts are unchanged, and the one-voxel
    margin keeps a surface erosion identical to one on the full array (each box edge is either
    background or the array's own edge)."""
    box = _bounding_box(pred | gt, margin=1)
    if box is None:
        return None
    return pred[box], gt[box]


def _surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: np.ndarray, connectivity: int
) -> tuple[np.ndarray, np.ndarray]:
    """surface_distances on masks already cropped by _crop_pair, both non-empty."""
    footprint = ndimage.generate_binary_structure(pred.ndim, connectivity)
    pred_surface = pred & ~ndimage.binary_erosion(pred, structure=footprint)
    gt_surface = gt & ~ndimage.binary_erosion(gt, structure=footprint)
    # The EDT measures the distance to the nearest zero, hence the inverted surfaces. Every
    # surface voxel lies in the crop, so distances within it are those of the full array.
    dist_to_gt = ndimage.distance_transform_edt(~gt_surface, sampling=spacing)
    dist_to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return dist_to_gt[pred_surface], dist_to_pred[gt_surface]


def _surface_metrics(
    pred: np.ndarray, gt: np.ndarray, shape: tuple[int, ...], spacing: np.ndarray, connectivity: int
) -> tuple[float, float]:
    """(hd95, asd) of cropped masks with the empty-mask convention; `shape` is the uncropped
    one, for the diagonal."""
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return 0.0, 0.0
    if not has_pred or not has_gt:
        diagonal = empty_mask_distance(shape, spacing)
        return diagonal, diagonal
    pred_to_gt, gt_to_pred = _surface_distances(pred, gt, spacing, connectivity)
    # Pooled in medpy's order (pred first), so that even the rounding of the mean is the same.
    pooled = np.concatenate([pred_to_gt, gt_to_pred])
    return float(np.percentile(pooled, 95)), float(pooled.mean())


def empty_mask_distance(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """Distance reported for HD95 and ASD when exactly one of prediction and ground truth is empty.

    Args:
      shape: shape of the image or volume, e.g. (H, W) or (D, H, W).
      spacing: size of a pixel or voxel along each axis, in array-axis order (mm or pixels);
        None means 1 per axis.

    Returns:
      The diagonal of the image or volume, ``sqrt(sum((shape * spacing) ** 2))``, in the unit of
      `spacing`.
    """
    extent = np.asarray(shape, dtype=np.float64) * _spacing_array(spacing, len(shape))
    return float(np.sqrt(np.sum(extent**2)))


def surface_distances(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | None = None,
    connectivity: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances between two non-empty binary masks, as medpy defines them.

    The surface of a mask is the set of its voxels removed by one binary erosion with the
    connectivity-`connectivity` structuring element (voxels beyond the array count as
    background, so a mask touching the border has a surface there). The distance of a surface
    voxel is the Euclidean distance, in the unit of `spacing`, between voxel centres to the
    nearest surface voxel of the other mask.

    Both distance transforms run once, on the bounding box of the union of the masks grown by
    one voxel: every surface voxel lies inside it, and so does the nearest surface voxel of the
    other mask, so the distances are those of the full array.

    Args:
      pred: predicted mask, (H, W) or (D, H, W); non-zero is foreground; must not be empty.
      gt: ground-truth mask of the same shape; must not be empty.
      spacing: voxel size along each axis, in array-axis order (e.g. (0.6, 0.6, 3.6) mm for a
        (H, W, D) volume); None means 1 per axis (distances in voxels).
      connectivity: connectivity of the erosion's structuring element (1 = faces only, medpy's
        default; up to ndim).

    Returns:
      (pred_to_gt, gt_to_pred): float64 distances of each surface voxel of `pred` to the surface
      of `gt`, and of each surface voxel of `gt` to the surface of `pred`, in raster order.
    """
    pred, gt = _check_pair(pred, gt)
    spacing = _spacing_array(spacing, pred.ndim)
    cropped = _crop_pair(pred, gt)
    if cropped is None or not cropped[0].any() or not cropped[1].any():
        raise ValueError("surface distances need two non-empty masks; see compute_surface_metrics")
    return _surface_distances(*cropped, spacing, connectivity)


def compute_surface_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | None = None,
    connectivity: int = 1,
) -> tuple[float, float]:
    """HD95 and ASD of a binary structure, from one pair of distance transforms.

    * HD95 is the 95th percentile (NumPy's default linear interpolation) of the union of both
      directed surface-distance sets, i.e. ``medpy.metric.binary.hd95``.
    * ASD is the average *symmetric* surface distance: the mean over the surface voxels of both
      masks of their distance to the other mask's surface, i.e. the mean of the pooled set
      ``concatenate([pred_to_gt, gt_to_pred])``. This is ``medpy.metric.binary.assd`` as of medpy
      0.5 (the pinned version) and MONAI's ``compute_average_surface_distance(symmetric=True)``.
      medpy's ``asd(pred, gt)`` is only the directed mean ``mean(pred_to_gt)``; ASD is the
      surface-size-weighted average of the two directed means,
      ``(n_pred * asd(pred, gt) + n_gt * asd(gt, pred)) / (n_pred + n_gt)`` with ``n_*`` the
      numbers of surface voxels. Releases of medpy before 0.5 took the unweighted mean of the
      two directed means instead; the two agree only when both surfaces have as many voxels.

    Args:
      pred: predicted mask, (H, W) or (D, H, W); non-zero is foreground.
      gt: ground-truth mask of the same shape.
      spacing: voxel size along each axis in array-axis order; None means 1 per axis.
      connectivity: connectivity used to extract surfaces (1 = medpy's default).

    Returns:
      (hd95, asd) in the unit of `spacing`. Empty masks follow the module's convention: both
      empty gives (0, 0); exactly one empty gives the diagonal ``empty_mask_distance`` twice.
    """
    pred, gt = _check_pair(pred, gt)
    spacing = _spacing_array(spacing, pred.ndim)
    cropped = _crop_pair(pred, gt)
    if cropped is None:
        return 0.0, 0.0
    return _surface_metrics(*cropped, pred.shape, spacing, connectivity)


def compute_case_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | None = None,
    connectivity: int = 1,
) -> dict[str, float | bool]:
    """Dice, HD95 and ASD of one structure in one case, with the empty-mask flags.

    One pass over the full arrays finds the bounding box of both masks; everything else works
    on that box (see ``compute_surface_metrics`` for the definitions).

    Args:
      pred: predicted mask, (H, W) or (D, H, W); non-zero is foreground. Unpadded.
      gt: ground-truth mask of the same shape.
      spacing: voxel size along each axis in array-axis order (mm for reports in mm); None
        means 1 per axis (pixels).
      connectivity: connectivity used to extract surfaces (1 = medpy's default).

    Returns:
      ``{"dice", "hd95", "asd", "empty_pred", "empty_gt"}``: Python floats (never NaN, see the
      module's empty-mask convention) and bools telling whether each mask was empty.
    """
    pred, gt = _check_pair(pred, gt)
    spacing = _spacing_array(spacing, pred.ndim)
    cropped = _crop_pair(pred, gt)
    if cropped is None:
        return {"dice": 1.0, "hd95": 0.0, "asd": 0.0, "empty_pred": True, "empty_gt": True}
    hd95, asd = _surface_metrics(*cropped, pred.shape, spacing, connectivity)
    return {
        "dice": float(_dice(*cropped)),
        "hd95": hd95,
        "asd": asd,
        "empty_pred": not cropped[0].any(),
        "empty_gt": not cropped[1].any(),
    }


def compute_slicewise_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | None = None,
    connectivity: int = 1,
) -> dict[str, float | bool | int]:
    """Volume Dice and in-plane HD95 / ASD of a stack of slices whose slice distance is unknown.

    Without a slice distance, a distance across slices has no physical meaning: HD95 and ASD are
    computed in 2-D on each slice (``compute_case_metrics`` of the slice, in the unit of the
    in-plane `spacing`) and averaged over the slices where the prediction or the ground truth
    has the structure. Per slice the module's empty-mask convention holds: a slice where exactly
    one of them is empty (a missed or hallucinated slice) scores the slice diagonal, and a slice
    where both are empty has nothing to measure and is not averaged (it is counted as not
    scored). Dice is that of the whole volume.

    Args:
      pred: predicted mask (D, H, W), slices along the first axis; non-zero is foreground.
      gt: ground-truth mask of the same shape.
      spacing: in-plane pixel size (row, col); None means 1 (pixels).
      connectivity: connectivity used to extract surfaces (1 = medpy's default).

    Returns:
      ``{"dice", "hd95", "asd", "empty_pred", "empty_gt"}`` as ``compute_case_metrics`` (empty
      flags of the whole volume; both empty gives Dice 1, HD95 = ASD = 0), and the slice counts
      ``"slices_scored"`` (prediction or ground truth non-empty), ``"slices_empty_pred"`` (ground
      truth but no prediction) and ``"slices_empty_gt"`` (prediction but no ground truth).
    """
    pred, gt = _check_pair(pred, gt)
    if pred.ndim != 3:
        raise ValueError(f"expected a (D, H, W) stack of slices, got shape {pred.shape}")
    spacing = _spacing_array(spacing, 2)
    has_pred, has_gt = np.any(pred, axis=(1, 2)), np.any(gt, axis=(1, 2))
    scored = np.flatnonzero(has_pred | has_gt)
    per_slice = [compute_case_metrics(pred[k], gt[k], spacing, connectivity) for k in scored]
    return {
        "dice": compute_dice(pred, gt),
        "hd95": float(np.mean([m["hd95"] for m in per_slice])) if per_slice else 0.0,
        "asd": float(np.mean([m["asd"] for m in per_slice])) if per_slice else 0.0,
        "empty_pred": not has_pred.any(),
        "empty_gt": not has_gt.any(),
        "slices_scored": int(scored.size),
        "slices_empty_pred": int(np.count_nonzero(has_gt & ~has_pred)),
        "slices_empty_gt": int(np.count_nonzero(has_pred & ~has_gt)),
    }


# ---------------------------------------------------------------------------------------------
# Summaries over cases.
# ---------------------------------------------------------------------------------------------


def summarize(values: Sequence[float] | np.ndarray) -> dict[str, float | int]:
    """Mean, standard deviation, median and count of per-case values.

    Args:
      values: one value per case. Nothing is dropped: a NaN among them makes mean, std and median
        NaN, so that a missing value is seen rather than silently skipped.

    Returns:
      ``{"mean", "std", "median", "n"}``; ``std`` is the population standard deviation
      (ddof=0, ``np.std``'s default: the spread of these cases, not an estimate for a wider
      population). With no values, the three statistics are NaN and ``n`` is 0.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "median": float("nan"), "n": 0}
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=0)),
        "median": float(np.median(values)),
        "n": int(values.size),
    }


def summarize_cases(
    cases: Sequence[Mapping[str, object]],
    metric_names: Sequence[str] = ("dice", "hd95", "asd"),
) -> dict[str, dict[str, object]]:
    """Per-structure summaries of per-case metrics.

    Args:
      cases: one mapping per case from structure name (e.g. "od", "oc", "prostate") to the dict
        returned by ``compute_case_metrics``. Entries whose value is not a mapping (e.g. a
        "case_id" string) are ignored. A structure absent from some cases is summarised over the
        cases that have it.
      metric_names: metrics to summarise.

    Returns:
      ``{structure: {metric: summarize(...), ..., "n": cases, "n_empty_pred": int,
      "n_empty_gt": int}}``, structures in order of first appearance.
    """
    per_structure: dict[str, list[Mapping[str, object]]] = {}
    for case in cases:
        for structure, result in case.items():
            if isinstance(result, Mapping):
                per_structure.setdefault(structure, []).append(result)
    summaries: dict[str, dict[str, object]] = {}
    for structure, results in per_structure.items():
        summary: dict[str, object] = {
            name: summarize([result[name] for result in results]) for name in metric_names
        }
        summary["n"] = len(results)
        summary["n_empty_pred"] = sum(bool(result["empty_pred"]) for result in results)
        summary["n_empty_gt"] = sum(bool(result["empty_gt"]) for result in results)
        summaries[structure] = summary
    return summaries
