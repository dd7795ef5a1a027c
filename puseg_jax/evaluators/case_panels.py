"""Panels of evaluated cases: the arrays of a case as scored, drawn by `drawing.panels` to PNG
and TensorBoard."""

import ml_collections
import numpy as np

from puseg_jax.core.datasets import DatasetInfo
from puseg_jax.core.logging_utils import MetricWriter
from puseg_jax.drawing import panels
from puseg_jax.evaluators.records import Predictions
from puseg_jax.evaluators.scoring import group_cases, gt_structures, postprocess_case

# ---------------------------------------------------------------------------------------------
# Panels: the arrays of a case as scored, drawn by `panels`.


def case_arrays(
    pred: Predictions, idx: np.ndarray, info: DatasetInfo, config
) -> dict[str, np.ndarray]:
    """The arrays of one case, post-processed as `score_cases` scores them.

    Args:
      pred: predictions of a domain.
      idx: the case's example indices in slice order (from `group_cases`).
      info: the dataset family.
      config: the run's config (threshold, largest component).

    Returns:
      {'image': [D, H, W, C], 'gt': [S, D, H, W], 'pred': [S, D, H, W], 'uncertainty':
      [D, H, W]}, with D = 1 for 2-D cases. Volumes are post-processed in 3-D, like the metrics.
    """
    return {
        "image": pred.image[idx],
        "gt": gt_structures(pred.label[idx], info),
        "pred": postprocess_case(pred.probability[idx], info, config),
        "uncertainty": pred.uncertainty[idx],
    }


def panel_title(method: str, name: str, role: str, step: int | None) -> str:
    """The header of an evaluator's panels: 'ours · Domain1 (target) · step 300'."""
    return f"{method} · {name} ({role})" + ("" if step is None else f" · step {step}")


def draw_case(
    pred: Predictions,
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
    pred: Predictions,
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
    panels.write_tensorboard(writer, step, name, drawn, pred.uncertainty, png_dir)
