"""Post-processing and scoring on the host: per-case Dice/HD95/ASD on the grid of
`config.eval.resolution`, and the quality of the uncertainty map."""

from typing import Any

import ml_collections
import numpy as np
from absl import logging

from puseg_jax import metrics
from puseg_jax.core import resample
from puseg_jax.core.datasets import DatasetInfo
from puseg_jax.evaluators.records import SLICE_COUNTS, Predictions

SURFACE_METRICS = ("dice", "hd95", "asd")

# Evaluators whose results may choose a checkpoint: the source domains' validation splits.
SELECTION_ROLE = "source_val"

# Grids cases can be scored on (`config.eval.resolution`), see the module docstring.
RESOLUTIONS = ("native", "network")


def scoring_resolution(config: ml_collections.ConfigDict) -> str:
    """`config.eval.resolution`; configs saved before the field existed score natively."""
    return config.eval.get("resolution", "native")


# ---------------------------------------------------------------------------------------------
# Post-processing and per-case scores.


def postprocess_case(
    probability: np.ndarray, info: DatasetInfo, config: ml_collections.ConfigDict
) -> np.ndarray:
    """The post-processing of one case: threshold (or argmax), cup inside disc, largest
    component. Every mask scored, drawn, written or used for QC comes from here.

    Args:
      probability: [D, H, W, K], the case's examples in slice order (D = 1 for an image), on
        the grid the masks are wanted on.
      info: the dataset family (label mode, structures, volumetric).
      config: the experiment config (eval.threshold, eval.largest_component).

    Returns:
      Boolean [S, D, H, W]. Sigmoid structures are nested: structure k is restricted to
      structure k - 1 before its largest component is taken (the cup inside the disc). With
      `largest_component`, a volume keeps its largest 3-D component, an image its largest 2-D
      one.
    """
    if info.volumetric:
        return _structure_masks(probability, info, config)
    return _structure_masks(probability[0], info, config)[:, None]


def _structure_masks(
    probs: np.ndarray, info: DatasetInfo, config: ml_collections.ConfigDict
) -> np.ndarray:
    """[..., K] probabilities -> boolean [S, ...], components connected in the array's own
    dimensions."""
    ec = config.eval
    lcc = metrics.largest_connected_component if ec.largest_component else (lambda m: m)
    masks = []
    if info.label_mode == "sigmoid":
        inside = None
        for k in range(len(info.structures)):
            m = probs[..., k] > ec.threshold
            if inside is not None:
                m &= inside
            inside = lcc(m)
            masks.append(inside)
    else:
        label = np.argmax(probs, axis=-1)
        masks = [lcc(label == k + 1) for k in range(len(info.structures))]
    return np.stack(masks)


def gt_structures(mask: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """Class mask [...] -> ground-truth structure masks [S, ...] (nested for sigmoid)."""
    if info.label_mode == "sigmoid":
        return np.stack([mask > k for k in range(len(info.structures))])
    return np.stack([mask == k + 1 for k in range(len(info.structures))])


def group_cases(pred: Predictions, volumetric: bool) -> list[tuple[str, np.ndarray]]:
    """Cases of a split in order of first appearance, with their example indices.

    Args:
      pred: predictions with at least `case_id` and `slice_index`, examples in any order.
      volumetric: whether examples are slices of volumes.

    Returns:
      [(case_id, indices)]: for volumes the indices of the case's slices sorted by
      slice_index (the re-stacked volume is pred.<field>[indices]); one example per case in 2-D.
      Two examples of one slice raise ValueError; a gap in the slice indices is logged (the
      slices are stacked as if adjacent).
    """
    if not volumetric:
        return [(str(c), np.array([i])) for i, c in enumerate(pred.case_id)]
    cases: dict[str, list[tuple[int, int]]] = {}
    for i, (c, s) in enumerate(zip(pred.case_id, pred.slice_index, strict=True)):
        cases.setdefault(str(c), []).append((int(s), i))
    out = []
    for c, items in cases.items():
        items.sort()
        slices = [s for s, _ in items]
        if len(set(slices)) != len(slices):
            raise ValueError(f"Case {c} has two examples of one slice: slices {slices}")
        if slices[-1] - slices[0] + 1 != len(slices):
            logging.warning(
                "Case %s: slices %s are not consecutive; stacked as adjacent.", c, slices
            )
        out.append((c, np.array([i for _, i in items])))
    return out


def case_spacing(
    pred: Predictions, idx: np.ndarray, volumetric: bool, key: str = "spacing"
) -> np.ndarray:
    """Pixel or voxel size of one case in array-axis order: (row, col) for an image,
    (slice, row, col) for a volume [D, H, W]; the stored spacing (field `key`: 'spacing' of the
    network grid or 'native_spacing') is (row, col, slice)."""
    spacing = np.unique(getattr(pred, key)[idx], axis=0)
    if len(spacing) != 1:
        raise ValueError(f"Slices of one case have different spacings: {spacing.tolist()}")
    spacing = spacing[0].astype(np.float64)
    return spacing[[2, 0, 1]] if volumetric else spacing[:2]


def to_native(x: np.ndarray, shape) -> np.ndarray:
    """An example's probabilities [h, w, K] or uncertainty [h, w] on the network's grid,
    resampled bilinearly (half-pixel centres) to its native grid `shape` (H, W); float32."""
    return resample.resize_bilinear(x, tuple(int(n) for n in shape))


def scored_case(
    pred: Predictions, idx: np.ndarray, info: DatasetInfo, resolution: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case's probabilities, ground truth and spacing on the grid it is scored on.

    Args:
      pred: `predict_split`'s output (`native_label` needed for 'native').
      idx: the case's example indices (`group_cases`), slices in order.
      info: the dataset family.
      resolution: 'native' (probabilities resampled to the native grid, the unresized ground
        truth) or 'network' (both on the network's grid).

    Returns:
      (probs [D, H, W, K] float32, class mask [D, H, W], spacing in array-axis order as
      `case_spacing`), D = 1 for an image.
    """
    if resolution == "network":
        return pred.probability[idx], pred.label[idx], case_spacing(pred, idx, info.volumetric)
    probs = native_probs(pred, idx)
    mask = np.stack([pred.native_label[i] for i in idx])
    return probs, mask, case_spacing(pred, idx, info.volumetric, key="native_spacing")


def native_probs(pred: Predictions, idx: np.ndarray, key: str = "probability") -> np.ndarray:
    """One case's probabilities (or, with key='uncertainty', its uncertainty map) resampled to
    its native grid: [D, H, W, K] (or [D, H, W]), D = 1 for an image; what 'native' scoring
    thresholds, and what `python -m puseg_jax.evaluate` writes back to the user's files.

    Args:
      pred: `predict_split`'s output (`native_shape` per example).
      idx: the case's example indices (`group_cases`), slices in order.
      key: 'probability' or 'uncertainty'.
    """
    shapes = np.unique(pred.native_shape[idx], axis=0)
    if len(shapes) != 1:
        raise ValueError(
            f"Slices of case {pred.case_id[idx[0]]} have different native shapes "
            f"{shapes.tolist()}; they cannot be stacked into one volume"
        )
    values = getattr(pred, key)
    return np.stack([to_native(values[i], shapes[0]) for i in idx])


def check_labels(mask: np.ndarray, info: DatasetInfo, case_id: str) -> None:
    """Refuses to score a ground truth with values beyond the family's classes: e.g. the 255 of
    a domain built without labels (`data_builders.common.UNLABELLED_MASK_VALUE`), which must
    never pass for a mask."""
    top = int(mask.max()) if mask.size else 0
    if top > len(info.structures):
        raise ValueError(
            f"Case {case_id}: ground truth holds class {top}, beyond the {len(info.structures)} "
            f"structures of {info.builder}; a domain built without labels (255) cannot be scored"
        )


def slicewise_distances(info: DatasetInfo, unit: str, resolution: str) -> bool:
    """Whether HD95/ASD are measured per 2-D slice: natively scored volumes without a physical
    slice distance (unit 'pixel', the ProstateSlice PNGs)."""
    return info.volumetric and unit == "pixel" and resolution == "native"


def describe_distances(info: DatasetInfo, unit: str, resolution: str) -> str:
    """How an evaluator's HD95/ASD were measured, for its summaries and tables (the 'distance'
    field): '2-D, released pixels', '3-D, mm', '2-D per slice, released pixels', and on the
    network grid e.g. '2-D on the network grid, released pixels'."""
    words = "released pixels" if unit == "pixel" else unit
    if slicewise_distances(info, unit, resolution):
        return f"2-D per slice, {words}"
    where = "" if resolution == "native" else " on the network grid"
    text = f"{'3-D' if info.volumetric else '2-D'}{where}, {words}"
    if info.volumetric and unit == "pixel":
        text += ", slice distance taken as 1 pixel"
    return text


def score_cases(
    pred: Predictions, info: DatasetInfo, config: ml_collections.ConfigDict, full: bool
) -> list[dict[str, Any]]:
    """Per-case metrics of every structure, on the grid of `config.eval.resolution`.

    Args:
      pred: `predict_split`'s output.
      info: the dataset family.
      config: the experiment config (post-processing, eval.resolution).
      full: Dice, HD95 and ASD (True) or Dice only (periodic validation).

    Returns:
      [{'case_id', 'num_slices', <structure>: {'dice', ['hd95', 'asd'], 'empty_pred',
      'empty_gt'}}], one row per image (2-D) or volume (3-D, in the unit of the spacing). With
      per-slice distances (`slicewise_distances`) each structure also holds the slice counts of
      `metrics.compute_slicewise_metrics` ('slices_scored', 'slices_empty_pred',
      'slices_empty_gt').
    """
    resolution = scoring_resolution(config)
    per_slice = full and slicewise_distances(info, distance_unit(pred), resolution)
    rows = []
    for case_id, idx in group_cases(pred, info.volumetric):
        probs, mask, spacing = scored_case(pred, idx, info, resolution)
        check_labels(mask, info, case_id)
        gt = gt_structures(mask, info)
        pm = postprocess_case(probs, info, config)  # [S, D, H, W]
        if not info.volumetric:
            pm, gt = pm[:, 0], gt[:, 0]
        row: dict[str, Any] = {"case_id": case_id, "num_slices": len(idx)}
        for s, name in enumerate(info.structures):
            if per_slice:
                # In-plane spacing only: the slice distance is unknown.
                row[name] = metrics.compute_slicewise_metrics(pm[s], gt[s], spacing[1:])
            elif full:
                row[name] = metrics.compute_case_metrics(pm[s], gt[s], spacing)
            else:
                row[name] = {
                    "dice": metrics.compute_dice(pm[s], gt[s]),
                    "empty_pred": not pm[s].any(),
                    "empty_gt": not gt[s].any(),
                }
        rows.append(row)
    return rows


def structures_band(mask: np.ndarray, info: DatasetInfo, width: float) -> np.ndarray:
    """Pixels within `width` of the boundary of any ground-truth structure, per 2-D image
    (`metrics.boundary_band` of each structure): the band of `uncertainty_quality`'s
    u_boundary (the rest is its u_interior)."""
    band = np.zeros(mask.shape, bool)
    for s in gt_structures(mask, info):
        band |= metrics.boundary_band(s, width)
    return band


def _pixel_sums(
    probs: np.ndarray, mask: np.ndarray, unc: np.ndarray, band: np.ndarray, info: DatasetInfo
) -> dict[str, Any]:
    """The additive parts of `uncertainty_quality` over a set of pixels (any leading shape:
    [N, H, W] or one image [H, W]), and each pixel's uncertainty and error, for the AUROC."""
    gt = gt_structures(mask, info)  # [S, ...]
    if info.label_mode == "sigmoid":
        target = np.moveaxis(gt, 0, -1)  # [..., K]
        conf = np.maximum(probs, 1 - probs)
        correct = (probs > 0.5) == target
        error = np.any(~correct, axis=-1)
        brier = metrics.brier_score(probs, target, reduction="sum")
        nll = metrics.nll(probs, target, reduction="sum")
    else:
        conf = probs.max(axis=-1)
        correct = probs.argmax(axis=-1) == mask
        error = ~correct
        brier = metrics.brier_score(probs, mask, reduction="sum")
        nll = metrics.nll(probs, mask, reduction="sum")
    return {
        "calibration": metrics.calibration_sums(conf, correct, n_bins=15),
        "brier": brier,
        "nll": nll,
        "n_scored": conf.size,  # what the Brier score and the NLL average over
        "n_error": int(np.count_nonzero(error)),
        "n_pixels": error.size,
        "u_band": float(unc[band].sum(dtype=np.float64)),
        "n_band": int(np.count_nonzero(band)),
        "u_rest": float(unc[~band].sum(dtype=np.float64)),
        "n_rest": int(np.count_nonzero(~band)),
        "uncertainty": np.asarray(unc, np.float32).ravel(),
        "error": error.ravel(),
    }


def uncertainty_quality(
    pred: Predictions, info: DatasetInfo, width: float, resolution: str = "network"
) -> dict:
    """Pixel-level calibration and uncertainty-error agreement over a whole split.

    Sigmoid outputs are scored per channel (each channel a binary prediction at 0.5); a pixel
    is misclassified when any channel is wrong. Softmax outputs are scored by their argmax.
    At 'native' resolution each example's probabilities and uncertainty map are resampled
    bilinearly to its native grid and compared with the unresized ground truth, one example at
    a time: the sums are added, and only each pixel's uncertainty (float32) and error (bool)
    are kept, for the AUROC.

    Args:
      pred: `predict_split`'s output (`native_label` needed for 'native').
      info: the dataset family.
      width: half-width of the band around ground-truth boundaries, in pixels of the grid
        scored.
      resolution: the grid of the pixels, 'native' or 'network'.

    Returns:
      {'ece' (15 bins), 'brier', 'nll', 'auroc_error' (uncertainty as a detector of
      misclassified pixels), 'error_rate', 'u_boundary', 'u_interior', 'u_boundary_ratio',
      'reliability' (bin edges, confidence, accuracy and counts)}.
    """
    if resolution == "network":
        mask = pred.label
        band = structures_band(mask, info, width)
        parts = [_pixel_sums(pred.probability, mask, pred.uncertainty, band, info)]
    else:
        parts = []
        for i, mask in enumerate(pred.native_label):
            probs = to_native(pred.probability[i], mask.shape)
            unc = to_native(pred.uncertainty[i], mask.shape)
            band = structures_band(mask, info, width)
            parts.append(_pixel_sums(probs, mask, unc, band, info))
    cal = metrics.calibration_from_sums(
        {k: sum(p["calibration"][k] for p in parts) for k in parts[0]["calibration"]}
    )
    total = {k: sum(p[k] for p in parts) for k in parts[0] if k not in _PER_PIXEL}
    u_band = total["u_band"] / total["n_band"] if total["n_band"] else float("nan")
    u_rest = total["u_rest"] / total["n_rest"] if total["n_rest"] else float("nan")
    unc = np.concatenate([p["uncertainty"] for p in parts])
    error = np.concatenate([p["error"] for p in parts])
    return {
        "ece": cal["ece"],
        "brier": total["brier"] / total["n_scored"],
        "nll": total["nll"] / total["n_scored"],
        "auroc_error": metrics.auroc(unc, error),
        "error_rate": total["n_error"] / total["n_pixels"],
        "u_boundary": u_band,
        "u_interior": u_rest,
        "u_boundary_ratio": u_band / u_rest if u_rest > 0 else float("nan"),
        "reliability": {k: np.asarray(v).tolist() for k, v in cal.items() if k != "ece"},
    }


_PER_PIXEL = ("calibration", "uncertainty", "error")


def score_split(
    pred: Predictions,
    info: DatasetInfo,
    config: ml_collections.ConfigDict,
    ev: dict,
    step: int,
    full: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Scores one evaluator's predictions: per-case metrics, their summary and (full) the
    uncertainty quality, all on the grid of `config.eval.resolution`.

    Args:
      pred: `predict_split`'s output.
      info: the dataset family.
      config: the experiment config (eval.*).
      ev: the evaluator, {'domain', 'split', 'role'}.
      step: the step evaluated.
      full: Dice, HD95, ASD and uncertainty quality; else Dice only.

    Returns:
      (result, rows): rows as `score_cases`; result {'role', 'domain', 'split', 'step',
      'num_examples', 'num_cases', 'resolution' ('native' | 'network'), 'distance_unit'
      ('mm' | 'pixel'), 'distance' (how HD95/ASD were measured, `describe_distances`),
      'structures' (`metrics.summarize_cases`, plus 'n_slices_scored', 'n_slices_empty_pred'
      and 'n_slices_empty_gt' summed over cases where distances are per slice), and when full
      'uncertainty_resolution' and 'uncertainty' (`uncertainty_quality`)}.
    """
    resolution = scoring_resolution(config)
    unit = distance_unit(pred)
    rows = score_cases(pred, info, config, full)
    summary = metrics.summarize_cases(rows, SURFACE_METRICS if full else ("dice",))
    for s, sm in summary.items():
        for key in SLICE_COUNTS:
            counts = [row[s][key] for row in rows if key in row[s]]
            if counts:
                sm[f"n_{key}"] = int(sum(counts))
    res: dict[str, Any] = {
        "role": ev["role"],
        "domain": ev["domain"],
        "split": ev["split"],
        "step": int(step),
        "num_examples": int(len(pred.case_id)),
        "num_cases": len(rows),
        "resolution": resolution,
        "distance_unit": unit,
        "distance": describe_distances(info, unit, resolution),
        "structures": summary,
    }
    if full:
        # Computed on the grid the cases are scored on.
        res["uncertainty_resolution"] = resolution
        res["uncertainty"] = uncertainty_quality(pred, info, config.eval.boundary_width, resolution)
    return res, rows


def distance_unit(pred: Predictions) -> str:
    """The one spacing unit of an evaluator's examples ('mm' or 'pixel'); mixed units raise."""
    units = set(pred.spacing_unit.tolist())
    if len(units) != 1:
        raise ValueError(f"Mixed spacing units {units} within one evaluator")
    return units.pop()
