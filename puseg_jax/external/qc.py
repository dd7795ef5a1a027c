"""Quality control of an external domain: the QC score chosen on source validation and the
review.csv that ranks cases most doubtful first."""

import csv
import math
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


def finite_case_score(scores: Mapping[str, float], image_mean: float | None = None) -> float:
    """A case's QC score, never inf or NaN: the most doubtful of its structures that have a
    score. A structure predicted empty (or, for `boundary_mean`, without a boundary) has none:
    `review_rows` ranks it first and names it (`no_prediction`) instead of writing `inf`. With
    no structure scored: the case's mean uncertainty (`image_mean`), else 1.0 (the top of the
    uncertainty scale)."""
    finite = [float(v) for v in scores.values() if math.isfinite(float(v))]
    if finite:
        return max(finite)
    return float(image_mean) if image_mean is not None and math.isfinite(image_mean) else 1.0


def review_rows(
    qc_rows: Sequence[Mapping[str, Any]],
    score: str,
    sizes: Mapping[str, Mapping[str, float]],
    size_unit: str,
    info: DatasetInfo,
    dice: Mapping[str, Mapping[str, float]] | None,
    thresholds: Mapping[str, float],
    extra: Mapping[str, Mapping[str, Any]] | None = None,
    doubtful: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """review.csv's rows: every case, most doubtful first (ties keep the cases' order).

    Order: cases with a doubt named in `doubtful` (e.g. a photograph's doubtful localisation),
    then cases with a structure predicted empty (`no_prediction`), then by `qc_score`.

    Columns: rank, case_id, qc_score (the case's, always finite: `finite_case_score`),
    no_prediction (the structures predicted empty, '|'-joined), doubt (with `doubtful`), per
    structure qc_<s> (inf for an empty prediction) and predicted_<s> (size on the original grid,
    in `size_unit`), size_unit, with labels dice_<s> and `fails` (any structure below its
    threshold), then the `extra` columns of the case (e.g. `Localisation.as_row()`).
    """
    rows = []
    for r in qc_rows:
        c = r["case_id"]
        scores = r["scores"][score]
        image_mean = r["scores"].get("image_mean", {})
        row: dict[str, Any] = {
            "case_id": c,
            "qc_score": finite_case_score(scores, max(image_mean.values(), default=None)),
            "no_prediction": "|".join(s for s in info.structures if not math.isfinite(scores[s])),
        }
        if doubtful is not None:
            row["doubt"] = doubtful.get(c, "")
        for s in info.structures:
            row[f"qc_{s}"] = scores[s]
        for s in info.structures:
            row[f"predicted_{s}"] = sizes[c][s]
        row["size_unit"] = size_unit
        if dice is not None:
            for s in info.structures:
                row[f"dice_{s}"] = dice[c][s]
            row["fails"] = any(dice[c][s] < t for s, t in thresholds.items())
        if extra is not None:
            row.update(extra.get(c, {}))
        rows.append(row)

    def key(i: int) -> tuple:
        row = rows[i]
        return (not row.get("doubt"), not row["no_prediction"], -row["qc_score"])

    order = sorted(range(len(rows)), key=key)  # stable
    return [dict(rank=k + 1, **rows[i]) for k, i in enumerate(order)]


def write_review(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """review.csv (a structure's own qc_<s> of an empty prediction is written 'inf'; the case's
    qc_score is finite)."""
    with open(path, "w", newline="") as f:
        # Every row's columns, in first-seen order (a folder may mix photographs, with their
        # localisation columns, and regions).
        fields = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
