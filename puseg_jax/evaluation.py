"""Evaluation of named evaluators: predict every example, score cases on the host, write reports.

`predict_split` -> `score_cases` (and `uncertainty_quality`) -> reports (`evaluate_domains`).

Nothing here looks at the labels to decide what to predict: every example of the split is
predicted (the last batch is padded and the padding dropped afterwards), at the network's input
size, with BatchNorm's running statistics, and only the images reach the devices. Volumes are
re-stacked from their slices by (case_id, slice_index), post-processed in 3-D and scored in 3-D
with the voxel spacing.

Where cases are scored (`config.eval.resolution`, recorded as 'resolution' in every summary):

* 'native' (default): on the grid of the released data, as the published tables and nnU-Net
  score. The class probabilities are resampled bilinearly (`resample.resize_bilinear`,
  half-pixel centres) from the network's grid to each example's native grid (a fundus image:
  the released ROI after the builder's centre crop, whatever its size; a NIfTI volume: its
  original in-plane grid, slices 1:1), then thresholded, post-processed and scored against the
  unresized ground truth with the spacing of one native pixel (mm from the NIfTI header).
  Volumes without a slice distance (the ProstateSlice PNGs) get volume Dice and in-plane
  HD95/ASD per slice (`metrics.compute_slicewise_metrics`: 2-D per slice in released pixels,
  averaged over the slices with the structure in the prediction or the ground truth; missed
  and hallucinated slices counted).
* 'network': on the network's input grid, against the nearest-resized ground truth, with the
  spacing of one network pixel (distances in the stored unit; ProstateSlice volumes in 3-D
  with a slice distance of one pixel). Every result before the field existed was scored so.

Each summary says how its distances were measured ('distance'). The uncertainty quality
(`uncertainty_quality`) is computed on the same grid as the scores ('uncertainty_resolution'),
the uncertainty map resampled like the probabilities.

Post-processing (the DoFE protocol, `config.eval`): a structure is foreground where its
probability is above `threshold` (sigmoid) or where it wins the argmax (softmax); nested
structures (fundus: the cup) are restricted to the structure that contains them (the disc);
with `largest_component`, each structure keeps its largest connected component, connected in
2-D for images and in 3-D for volumes.

Reports per evaluator, in `<workdir>/eval/<name>/`: `summary.json` (per structure and metric:
mean, std, median, n, and the counts of cases with an empty prediction or ground truth),
`per_case.csv`, `predictions.npz` (on the network grid, with each example's native shape and
spacing) and panels; the same scalars in TensorBoard under `eval/<name>/...`.
"""

import csv
import json
import math
import os
import zipfile
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from puseg_jax import input_pipeline, metrics, panels, parallel, resample
from puseg_jax.datasets import DatasetInfo
from puseg_jax.logging_utils import MetricWriter

SURFACE_METRICS = ("dice", "hd95", "asd")
# Evaluators whose results may choose a checkpoint: the source domains' validation splits.
SELECTION_ROLE = "source_val"
# Grids cases can be scored on (`config.eval.resolution`), see the module docstring.
RESOLUTIONS = ("native", "network")
# Per-slice counts of `metrics.compute_slicewise_metrics`, summed over cases in summaries.
SLICE_COUNTS = ("slices_scored", "slices_empty_pred", "slices_empty_gt")

_PRED_KEYS = (
    "image",
    "mask",
    "spacing",
    "spacing_unit",
    "case_id",
    "slice_index",
    "num_slices",
    "index",
    "native_shape",
    "native_spacing",
)


def scoring_resolution(config: ml_collections.ConfigDict) -> str:
    """`config.eval.resolution`; configs saved before the field existed score natively."""
    return config.eval.get("resolution", "native")


def make_writer(workdir: str) -> MetricWriter:
    """The run's TensorBoard and metrics.jsonl writer."""
    return MetricWriter(workdir)


# ---------------------------------------------------------------------------------------------
# Prediction.


def _process_rows(n: int) -> slice:
    """This process's rows of a global batch of n: contiguous blocks in process order, the
    layout `parallel.shard_batch` assembles on the 1-D mesh."""
    local = n // jax.process_count()
    return slice(jax.process_index() * local, (jax.process_index() + 1) * local)


def predict_split(
    p_eval_step,
    state,
    rng: jax.Array,
    config: ml_collections.ConfigDict,
    info: DatasetInfo,
    data_dir: str,
    mesh,
    strategy: str,
    domain: str,
    split: str,
) -> dict[str, np.ndarray]:
    """Predictions for every example of (domain, split), in the source's order, no padding.

    Args:
      p_eval_step: the wrapped eval step, (state, {'image'}, rng) -> {'probs', 'uncertainty'}.
      state: the model state in the layout the step expects.
      rng: key of the evaluation; batch i uses fold_in(rng, i).
      config: the experiment config.
      info: the dataset family.
      data_dir: the TFDS data dir.
      mesh: the device mesh.
      strategy: parallel.strategy.
      domain: the domain.
      split: its split.

    Returns:
      {'image', 'mask', 'spacing' (network grid), 'spacing_unit', 'case_id', 'slice_index',
      'num_slices', 'index', 'native_shape' [N, 2], 'native_spacing' [N, 3] (row, col, slice),
      'probs' [N, H, W, K], 'uncertainty' [N, H, W]} with N the split's size, and with
      `eval.resolution='native'` 'native_mask': an object array of N uint8 class masks, each
      on its example's native grid (sizes may differ between examples).
    """
    native = scoring_resolution(config) == "native"
    keys = _PRED_KEYS + (("native_mask",) if native else ())
    out: dict[str, list] = {k: [] for k in keys + ("probs", "uncertainty")}
    batches = input_pipeline.eval_batches(
        info, config, domain, split, data_dir, config.eval.batch_size, native_masks=native
    )
    for i, batch in enumerate(batches):
        valid = batch["valid"]
        # The images only: labels never reach the devices.
        local = {"image": batch["image"][_process_rows(len(valid))]}
        device_batch = parallel.shard_batch(local, mesh, strategy)
        pred = parallel.to_host(p_eval_step(state, device_batch, jax.random.fold_in(rng, i)))
        if len(pred["probs"]) != len(valid):
            raise ValueError(f"eval step returned {len(pred['probs'])} rows for {len(valid)}")
        for k in keys:
            out[k].append(batch[k][valid])
        out["probs"].append(np.asarray(pred["probs"])[valid])
        out["uncertainty"].append(np.asarray(pred["uncertainty"])[valid])
    return {k: np.concatenate(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Post-processing and per-case scores.


def structure_masks(
    probs: np.ndarray, info: DatasetInfo, config: ml_collections.ConfigDict
) -> np.ndarray:
    """Post-processed masks of one case.

    Args:
      probs: [H, W, K] for an image or [D, H, W, K] for a whole volume (slices in order).
      info: the dataset family (label mode, structures).
      config: the experiment config (eval.threshold, eval.largest_component).

    Returns:
      Boolean [S, H, W] or [S, D, H, W]. Sigmoid structures are nested: structure k is
      restricted to structure k - 1 before its largest component is taken (the cup inside the
      disc). With `largest_component`, components connect in the array's own dimensions: a
      volume keeps its largest 3-D component.
    """
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


def group_cases(pred: dict[str, np.ndarray], volumetric: bool) -> list[tuple[str, np.ndarray]]:
    """Cases of a split in order of first appearance, with their example indices.

    Args:
      pred: at least 'case_id' and 'slice_index' per example, in any order.
      volumetric: whether examples are slices of volumes.

    Returns:
      [(case_id, indices)]: for volumes the indices of the case's slices sorted by
      slice_index (the re-stacked volume is pred[...][indices]); one example per case in 2-D.
      Two examples of one slice raise ValueError; a gap in the slice indices is logged (the
      slices are stacked as if adjacent).
    """
    if not volumetric:
        return [(str(c), np.array([i])) for i, c in enumerate(pred["case_id"])]
    cases: dict[str, list[tuple[int, int]]] = {}
    for i, (c, s) in enumerate(zip(pred["case_id"], pred["slice_index"], strict=True)):
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
    pred: dict[str, np.ndarray], idx: np.ndarray, volumetric: bool, key: str = "spacing"
) -> np.ndarray:
    """Pixel or voxel size of one case in array-axis order: (row, col) for an image,
    (slice, row, col) for a volume [D, H, W]; the stored spacing (`pred[key]`: 'spacing' of the
    network grid or 'native_spacing') is (row, col, slice)."""
    spacing = np.unique(pred[key][idx], axis=0)
    if len(spacing) != 1:
        raise ValueError(f"Slices of one case have different spacings: {spacing.tolist()}")
    spacing = spacing[0].astype(np.float64)
    return spacing[[2, 0, 1]] if volumetric else spacing[:2]


def to_native(x: np.ndarray, shape) -> np.ndarray:
    """An example's probabilities [h, w, K] or uncertainty [h, w] on the network's grid,
    resampled bilinearly (half-pixel centres) to its native grid `shape` (H, W); float32."""
    return resample.resize_bilinear(x, tuple(int(n) for n in shape))


def scored_case(
    pred: dict[str, np.ndarray], idx: np.ndarray, info: DatasetInfo, resolution: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case's probabilities, ground truth and spacing on the grid it is scored on.

    Args:
      pred: `predict_split`'s output ('native_mask' needed for 'native').
      idx: the case's example indices (`group_cases`), slices in order.
      info: the dataset family.
      resolution: 'native' (probabilities resampled to the native grid, the unresized ground
        truth) or 'network' (both on the network's grid).

    Returns:
      (probs [D, H, W, K] float32, class mask [D, H, W], spacing in array-axis order as
      `case_spacing`), D = 1 for an image.
    """
    if resolution == "network":
        return pred["probs"][idx], pred["mask"][idx], case_spacing(pred, idx, info.volumetric)
    probs = native_probs(pred, idx)
    mask = np.stack([pred["native_mask"][i] for i in idx])
    return probs, mask, case_spacing(pred, idx, info.volumetric, key="native_spacing")


def native_probs(pred: dict[str, np.ndarray], idx: np.ndarray, key: str = "probs") -> np.ndarray:
    """One case's probabilities (or, with key='uncertainty', its uncertainty map) resampled to
    its native grid: [D, H, W, K] (or [D, H, W]), D = 1 for an image; what 'native' scoring
    thresholds, and what `python -m puseg_jax.evaluate` writes back to the user's files.

    Args:
      pred: `predict_split`'s output ('native_shape' per example).
      idx: the case's example indices (`group_cases`), slices in order.
      key: 'probs' or 'uncertainty'.
    """
    shapes = np.unique(pred["native_shape"][idx], axis=0)
    if len(shapes) != 1:
        raise ValueError(
            f"Slices of case {pred['case_id'][idx[0]]} have different native shapes "
            f"{shapes.tolist()}; they cannot be stacked into one volume"
        )
    return np.stack([to_native(pred[key][i], shapes[0]) for i in idx])


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
    pred: dict[str, np.ndarray], info: DatasetInfo, config: ml_collections.ConfigDict, full: bool
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
        if info.volumetric:
            pm = structure_masks(probs, info, config)  # [S, D, H, W]
        else:
            pm, gt = structure_masks(probs[0], info, config), gt[:, 0]
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


def _band(mask: np.ndarray, info: DatasetInfo, width: float) -> np.ndarray:
    """Pixels within `width` of any structure's ground-truth boundary, per 2-D image."""
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
    pred: dict[str, np.ndarray], info: DatasetInfo, width: float, resolution: str = "network"
) -> dict:
    """Pixel-level calibration and uncertainty-error agreement over a whole split.

    Sigmoid outputs are scored per channel (each channel a binary prediction at 0.5); a pixel
    is misclassified when any channel is wrong. Softmax outputs are scored by their argmax.
    At 'native' resolution each example's probabilities and uncertainty map are resampled
    bilinearly to its native grid and compared with the unresized ground truth, one example at
    a time: the sums are added, and only each pixel's uncertainty (float32) and error (bool)
    are kept, for the AUROC.

    Args:
      pred: `predict_split`'s output ('native_mask' needed for 'native').
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
        mask = pred["mask"]
        band = _band(mask, info, width)
        parts = [_pixel_sums(pred["probs"], mask, pred["uncertainty"], band, info)]
    else:
        parts = []
        for i, mask in enumerate(pred["native_mask"]):
            probs = to_native(pred["probs"][i], mask.shape)
            unc = to_native(pred["uncertainty"][i], mask.shape)
            parts.append(_pixel_sums(probs, mask, unc, _band(mask, info, width), info))
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


# ---------------------------------------------------------------------------------------------
# Evaluators.


def evaluate_domains(
    p_eval_step,
    state,
    rng: jax.Array,
    config: ml_collections.ConfigDict,
    info: DatasetInfo,
    data_dir: str,
    mesh,
    strategy: str,
    evals: dict[str, dict],
    workdir: str,
    step: int,
    writer: MetricWriter,
    full: bool = True,
) -> dict[str, dict]:
    """Evaluates each named evaluator.

    Args:
      p_eval_step: the wrapped eval step.
      state: the model state in the step's layout.
      rng: evaluation key (uncertainty samples).
      config: the experiment config.
      info: the dataset family.
      data_dir: the TFDS data dir.
      mesh: the device mesh.
      strategy: parallel.strategy.
      evals: {name: {'domain', 'split', 'role'}}.
      workdir: where eval/<name>/ goes.
      step: the step logged.
      writer: TensorBoard/metrics.jsonl writer (scalars under eval/<name>/...).
      full: Dice, HD95, ASD, uncertainty quality and reports on disk; else Dice only
        (periodic source validation).

    Returns:
      {name: `score_split` result}.
    """
    results = {}
    names = SURFACE_METRICS if full else ("dice",)
    for name, ev in evals.items():
        pred = predict_split(
            p_eval_step,
            state,
            rng,
            config,
            info,
            data_dir,
            mesh,
            strategy,
            ev["domain"],
            ev["split"],
        )
        res, rows = score_split(pred, info, config, ev, step, full)
        results[name] = res
        writer.scalars(step, _scalars(name, res, names))
        summary = res["structures"]
        dice_txt = ", ".join(f"{s} {summary[s]['dice']['mean']:.4f}" for s in summary)
        print(
            f"[eval] step {step} {name} ({ev['role']}, {ev['split']}, {res['num_cases']} cases, "
            f"{res['num_examples']} examples): Dice {dice_txt}",
            flush=True,
        )
        if full and jax.process_index() == 0:
            write_domain_reports(workdir, name, res, rows, pred, info, config, step, writer)
        elif jax.process_index() == 0:
            # Periodic (source-validation) evaluations: fixed cases and the uncertainty
            # histogram in TensorBoard, so a run can be followed while it trains.
            write_panels(writer, step, name, ev["role"], pred, rows, info, config)
    return results


def score_split(
    pred: dict[str, np.ndarray],
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
        "num_examples": int(len(pred["case_id"])),
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


def _scalars(name: str, res: dict, names: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for s, sm in res["structures"].items():
        for m in names:
            out[f"eval/{name}/{s}/{m}"] = sm[m]["mean"]
        out[f"eval/{name}/{s}/n_empty_pred"] = sm["n_empty_pred"]
        out[f"eval/{name}/{s}/n_empty_gt"] = sm["n_empty_gt"]
        for key in SLICE_COUNTS:
            if f"n_{key}" in sm:
                out[f"eval/{name}/{s}/n_{key}"] = sm[f"n_{key}"]
    for k, v in res.get("uncertainty", {}).items():
        if k != "reliability":
            out[f"eval/{name}/uncertainty/{k}"] = v
    return out


def distance_unit(pred: dict[str, np.ndarray]) -> str:
    """The one spacing unit of an evaluator's examples ('mm' or 'pixel'); mixed units raise."""
    units = set(pred["spacing_unit"].tolist())
    if len(units) != 1:
        raise ValueError(f"Mixed spacing units {units} within one evaluator")
    return units.pop()


def json_ready(x: Any) -> Any:
    """A nested structure with NaN and infinities as None (strict JSON) and numpy scalars as
    Python numbers."""
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(json_ready(obj), f, indent=2, allow_nan=False)


def save_npz(path: str, **arrays: np.ndarray) -> None:
    """`np.savez_compressed` at zlib level 1: as small within a few percent on predictions, and
    about twice as fast (compression is most of the time of an evaluator's reports)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)


PER_CASE_COLUMNS = (
    "case_id",
    "structure",
    "dice",
    "hd95",
    "asd",
    "empty_pred",
    "empty_gt",
    "num_slices",
    "unit",
    "distance",
) + SLICE_COUNTS


def write_per_case(
    path: str, rows: list[dict], info: DatasetInfo, unit: str, distance: str = ""
) -> None:
    """per_case.csv: one line per case and structure (distances in `unit`, measured as
    `distance` says; the slice counts are blank unless distances are per slice)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PER_CASE_COLUMNS)
        for row in rows:
            for s in info.structures:
                r = row[s]
                w.writerow(
                    [
                        row["case_id"],
                        s,
                        r["dice"],
                        r["hd95"],
                        r["asd"],
                        r["empty_pred"],
                        r["empty_gt"],
                        row["num_slices"],
                        unit,
                        distance,
                    ]
                    + [r.get(key, "") for key in SLICE_COUNTS]
                )


def write_domain_reports(
    workdir: str,
    name: str,
    res: dict,
    rows: list[dict],
    pred: dict[str, np.ndarray],
    info: DatasetInfo,
    config: ml_collections.ConfigDict,
    step: int,
    writer: MetricWriter,
) -> None:
    """Writes eval/<name>/{summary.json, per_case.csv, predictions.npz, panel_*.png} and the
    panels and uncertainty histogram to TensorBoard.

    A domain without labels (`python -m puseg_jax.evaluate` on images without masks) has no
    rows: it gets no per_case.csv, no label in predictions.npz and panels without ground truth.

    Args:
      workdir: the run's workdir.
      name: the evaluator.
      res: its `evaluate_domains` result.
      rows: its `score_cases` rows; None for a domain without labels.
      pred: its `predict_split` output.
      info: the dataset family.
      config: the experiment config (eval.save_predictions, eval.num_panels).
      step: the step logged.
      writer: the TensorBoard writer.
    """
    out = os.path.join(workdir, "eval", name)
    os.makedirs(out, exist_ok=True)
    _write_json(os.path.join(out, "summary.json"), res)
    if rows is not None:
        write_per_case(
            os.path.join(out, "per_case.csv"), rows, info, res["distance_unit"], res["distance"]
        )
    if config.eval.save_predictions:
        label = {} if rows is None else {"label": pred["mask"].astype(np.uint8)}
        save_npz(
            os.path.join(out, "predictions.npz"),
            image=pred["image"].astype(np.float16),
            **label,
            probability=pred["probs"].astype(np.float16),
            uncertainty=pred["uncertainty"].astype(np.float16),
            case_id=pred["case_id"].astype(str),
            slice_index=pred["slice_index"],
            spacing=pred["spacing"],
            spacing_unit=pred["spacing_unit"].astype(str),
            # The arrays above are on the network grid; a case's native grid, to resample them
            # to (`to_native`) and redraw or rescore it against the released ground truth.
            native_shape=pred["native_shape"],
            native_spacing=pred["native_spacing"],
            resolution=np.asarray(res.get("resolution", scoring_resolution(config))),
        )
    write_panels(writer, step, name, res["role"], pred, rows, info, config, png_dir=out)


# ---------------------------------------------------------------------------------------------
# Panels: the arrays of a case as scored, drawn by `panels`.


def case_arrays(
    pred: dict[str, np.ndarray], idx: np.ndarray, info: DatasetInfo, config
) -> dict[str, np.ndarray]:
    """The arrays of one case, post-processed as `score_cases` scores them.

    Args:
      pred: predictions of a domain (keys of `predict_split`: image, mask, probs, uncertainty,
        ...).
      idx: the case's example indices in slice order (from `group_cases`).
      info: the dataset family.
      config: the run's config (threshold, largest component).

    Returns:
      {'image': [D, H, W, C], 'gt': [S, D, H, W], 'pred': [S, D, H, W], 'uncertainty':
      [D, H, W]}, with D = 1 for 2-D cases. Volumes are post-processed in 3-D, like the metrics.
    """
    probs = pred["probs"][idx]
    if info.volumetric:
        pm = structure_masks(probs, info, config)
    else:
        pm = structure_masks(probs[0], info, config)[:, None]
    return {
        "image": pred["image"][idx],
        "gt": gt_structures(pred["mask"][idx], info),
        "pred": pm,
        "uncertainty": pred["uncertainty"][idx],
    }


def panel_title(method: str, name: str, role: str, step: int | None) -> str:
    """The header of an evaluator's panels: 'ours · Domain1 (target) · step 300'."""
    return f"{method} · {name} ({role})" + ("" if step is None else f" · step {step}")


def draw_case(
    pred: dict[str, np.ndarray],
    case_id: str,
    idx: np.ndarray,
    dice: dict[str, float] | None,
    info: DatasetInfo,
    config,
    title: str,
) -> np.ndarray:
    """The panel of one case (for volumes the slice with the largest ground-truth area), with
    the case's scored Dice in its header; without labels (`dice` None) the panel has no ground
    truth and error tiles, and shows the slice with the largest predicted area.

    Args:
      pred: predictions of a domain.
      case_id: the case.
      idx: its example indices in slice order (from `group_cases`).
      dice: the case's Dice per structure (a `score_cases` row, or per_case.csv); None for a
        case without labels.
      info: the dataset family.
      config: the run's config.
      title: the header's first line (`panel_title`).

    Returns:
      The drawn panel, RGB uint8 [H, W, 3].
    """
    arrays = case_arrays(pred, idx, info, config)
    labelled = dice is not None
    j = panels.representative_slice(arrays["gt"] if labelled else arrays["pred"])
    where = f", slice {j} of {arrays['pred'].shape[1]}" if info.volumetric else ""
    scores = f"Dice {panels.dice_text(dice)}" if labelled else "no labels, not scored"
    return panels.draw_panel(
        arrays["image"][j],
        arrays["gt"][:, j] if labelled else None,
        arrays["pred"][:, j],
        arrays["uncertainty"][j],
        info.structures,
        title,
        f"case {case_id}{where} · {scores}",
    )


def write_panels(
    writer: MetricWriter,
    step: int,
    name: str,
    role: str,
    pred: dict[str, np.ndarray],
    rows: list[dict],
    info: DatasetInfo,
    config: ml_collections.ConfigDict,
    png_dir: str | None = None,
) -> None:
    """Panels of the first `eval.num_panels` cases (fixed, so runs and steps are comparable)
    and the uncertainty histogram in TensorBoard; with `png_dir`, the panels as PNG files too.

    Args:
      writer: the TensorBoard writer.
      step: the step logged (in the panels' header too).
      name: the evaluator.
      role: its role ('source_val', 'target', or 'external' for `python -m puseg_jax.evaluate`).
      pred: its `predict_split` output.
      rows: its `score_cases` rows (the Dice in the headers); None for a domain without labels
        (panels without ground truth).
      info: the dataset family.
      config: the run's config (method, eval.num_panels, post-processing).
      png_dir: also write `panel_<i>_<case_id>.png` there.
    """
    dice = None
    if rows is not None:
        dice = {r["case_id"]: {s: r[s]["dice"] for s in info.structures} for r in rows}
    title = panel_title(config.method, name, role, step)
    drawn = [
        (case_id, draw_case(pred, case_id, idx, dice and dice[case_id], info, config, title))
        for case_id, idx in group_cases(pred, info.volumetric)[: config.eval.num_panels]
    ]
    panels.write_tensorboard(writer, step, name, drawn, pred["uncertainty"], png_dir)


# ---------------------------------------------------------------------------------------------
# Model selection and the run's summary.


def mean_dice(results: dict[str, dict]) -> float:
    """Mean Dice over evaluators and structures, the model-selection score.

    Args:
      results: `evaluate_domains` output of source-validation evaluators only.

    Returns:
      The mean of the per-structure mean Dice.

    Raises:
      ValueError: if any result is not a source-validation one: a target domain must never
        choose the checkpoint.
    """
    others = sorted(n for n, r in results.items() if r["role"] != SELECTION_ROLE)
    if others:
        raise ValueError(
            f"Model selection may use '{SELECTION_ROLE}' evaluators only, not {others}"
        )
    if not results:
        raise ValueError("No source-validation results to select a checkpoint with")
    vals = [r["structures"][s]["dice"]["mean"] for r in results.values() for s in r["structures"]]
    return float(np.mean(vals))


def make_summary(config, info, results, evals, selected, step) -> dict[str, Any]:
    """The run's summary.json: per evaluator and structure the means of Dice, HD95 and ASD and
    the case counts (the full statistics are in eval/<name>/summary.json)."""
    del evals
    out_evals = {}
    for n, r in results.items():
        ev: dict[str, Any] = {
            "role": r["role"],
            "domain": r["domain"],
            "split": r["split"],
            "num_examples": r["num_examples"],
            "num_cases": r["num_cases"],
            "resolution": r["resolution"],
            "distance_unit": r["distance_unit"],
            "distance": r["distance"],
        }
        for s, sm in r["structures"].items():
            ev[s] = {m: sm[m]["mean"] for m in SURFACE_METRICS if m in sm}
            ev[s] |= {"dice_std": sm["dice"]["std"], "n": sm["n"]}
            ev[s] |= {"n_empty_pred": sm["n_empty_pred"], "n_empty_gt": sm["n_empty_gt"]}
            ev[s] |= {f"n_{k}": sm[f"n_{k}"] for k in SLICE_COUNTS if f"n_{k}" in sm}
        if "uncertainty" in r:
            ev["uncertainty_resolution"] = r["uncertainty_resolution"]
            ev["uncertainty"] = {k: v for k, v in r["uncertainty"].items() if k != "reliability"}
        out_evals[n] = ev
    return {
        "method": config.method,
        "dataset": config.data.name,
        "source_domains": list(config.data.source_domains),
        "target_domains": list(config.data.target_domains),
        "seed": config.seed,
        "checkpoint": selected,
        "step": int(step),
        "structures": list(info.structures),
        "evals": out_evals,
    }


def write_summary(workdir: str, summary: dict) -> None:
    """Writes <workdir>/summary.json (process 0) and prints the results table."""
    if jax.process_index() != 0:
        return
    _write_json(os.path.join(workdir, "summary.json"), summary)
    print(format_table([summary]), flush=True)


def _cell(x: Any, digits: int) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def format_table(summaries: list[dict]) -> str:
    """Markdown table of run summaries: one row per (method, evaluator), per structure the mean
    Dice, HD95 and ASD (measured as the evaluator's 'distance' says: geometry, grid, unit) and
    the cases with an empty prediction.

    Args:
      summaries: `make_summary` outputs (e.g. erm and ours on the same data).

    Returns:
      The table, target evaluators after the source-validation ones of each run.
    """
    if not summaries:
        return ""
    structures = summaries[0]["structures"]
    head = ["method", "domain", "role", "distances", "cases"]
    for s in structures:
        head += [f"{s} Dice", f"{s} HD95", f"{s} ASD", f"{s} empty pred"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sm in summaries:
        evs = sorted(sm["evals"].items(), key=lambda kv: kv[1]["role"] == "target")
        for name, ev in evs:
            cells = [
                sm["method"],
                name,
                ev["role"],
                ev.get("distance", ev.get("distance_unit", "")),
                str(ev.get("num_cases", "")),
            ]
            for s in structures:
                r = ev[s]
                cells += [_cell(r.get("dice"), 4), _cell(r.get("hd95"), 2)]
                cells += [_cell(r.get("asd"), 2), str(r.get("n_empty_pred", ""))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
