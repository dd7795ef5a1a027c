"""Quality control of an external domain: the QC score chosen on source validation and the
review.csv that ranks cases most doubtful first."""

import csv
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from puseg_jax.core.datasets import DatasetInfo
from puseg_jax.evaluators import quality, records
from puseg_jax.evaluators.records import Predictions
from puseg_jax.runs.run_folder import RunFolder
from puseg_jax.train import config as train_config

REVIEW_FILE = "review.csv"

# ---------------------------------------------------------------------------------------------
# Quality control: the score, its choice on source validation, review.csv.


def source_val_predictions(
    workdir: str, config: ml_collections.ConfigDict
) -> tuple[dict[str, Predictions], dict[str, dict[str, dict[str, float]]], str]:
    """The saved predictions and per-case Dice of a run's source-validation evaluators.

    Returns:
      ({evaluator: `Predictions`}, {evaluator: {case_id: {structure: Dice}}}, '' or the reason
      they are not available).
    """
    names = [n for n, e in train_config.resolve_evals(config).items() if e["role"] == "source_val"]
    if not names:
        return {}, {}, "the run has no source-validation evaluator"
    run = RunFolder(workdir)
    preds, dice = {}, {}
    for n in names:
        if not (run.has_predictions(n) and run.has_per_case(n)):
            return {}, {}, f"{run.eval_dir(n)} has no predictions.npz and per_case.csv"
        preds[n] = run.predictions(n)
        dice[n] = records.case_dice(run.per_case(n))
    return preds, dice, ""


def choose_on_source_val(
    workdir: str,
    config: ml_collections.ConfigDict,
    info: DatasetInfo,
    thresholds: Mapping[str, float],
) -> dict[str, Any]:
    """`quality.choose_qc_score` on the run's source-validation cases (never a target).

    The predictions are those the final evaluation saved (`eval.save_predictions`), of the
    reported checkpoint; probabilities were stored as float16, so a mask recomputed from them can
    differ from the scored one on pixels within rounding of the threshold.

    Returns:
      The choice with 'source' (the evaluators used); `quality.FALLBACK_QC_SCORE` with the
      reason when the run saved no source-validation predictions.
    """
    preds, dice, missing = source_val_predictions(workdir, config)
    if missing:
        return {
            "score": quality.FALLBACK_QC_SCORE,
            "criterion": "fallback",
            "reason": missing,
            "source": [],
        }
    rows, all_dice = [], {}
    for n, pred in preds.items():
        for r in quality.case_qc(pred, info, config):
            key = f"{n}/{r['case_id']}"  # case ids repeat across domains
            rows.append(dict(r, case_id=key))
            all_dice[key] = dice[n][r["case_id"]]
    choice = quality.choose_qc_score(rows, all_dice, thresholds)
    choice["source"] = list(preds)
    return choice


REVIEW_COLUMNS = ("rank", "case_id", "qc_score")


def review_rows(
    qc_rows: Sequence[Mapping[str, Any]],
    score: str,
    sizes: Mapping[str, Mapping[str, float]],
    size_unit: str,
    info: DatasetInfo,
    dice: Mapping[str, Mapping[str, float]] | None,
    thresholds: Mapping[str, float],
) -> list[dict[str, Any]]:
    """review.csv's rows: every case, most doubtful first (ties keep the cases' order).

    Columns: rank, case_id, qc_score (the case's), per structure qc_<s> and predicted_<s> (size
    on the original grid, in `size_unit`), size_unit, and with labels dice_<s> and `fails`
    (any structure below its threshold).
    """
    rows = []
    for r in qc_rows:
        c = r["case_id"]
        row: dict[str, Any] = {"case_id": c, "qc_score": quality.case_score(r["scores"][score])}
        for s in info.structures:
            row[f"qc_{s}"] = r["scores"][score][s]
        for s in info.structures:
            row[f"predicted_{s}"] = sizes[c][s]
        row["size_unit"] = size_unit
        if dice is not None:
            for s in info.structures:
                row[f"dice_{s}"] = dice[c][s]
            row["fails"] = any(dice[c][s] < t for s, t in thresholds.items())
        rows.append(row)
    order = sorted(range(len(rows)), key=lambda i: -rows[i]["qc_score"])  # stable
    return [dict(rank=k + 1, **rows[i]) for k, i in enumerate(order)]


def write_review(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """review.csv (an infinite score, an empty prediction, is written 'inf')."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
