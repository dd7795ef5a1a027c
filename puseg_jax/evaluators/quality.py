"""Per-case quality control from the uncertainty map: which cases should a person check?

A hospital running the model on its own images cannot score them (it has no labels), but it can
rank them by how unsure the model was and have a person check the top of the list. Each case
gets, per structure, a quality-control (QC) score; higher means more doubtful. The candidates,
all computed on the network's grid from the post-processed prediction P of the structure and the
uncertainty map U (the same grid and post-processing as the scores, so that a score chosen on one
split means the same on another):

* `image_mean`: mean U over the whole image or volume, the same for every structure (the plain
  case-level flag).
* `region_mean`: mean U inside and around the prediction, over P dilated by `band` pixels
  (in-plane, slice by slice for volumes).
* `boundary_mean`: mean U in the band of `band` pixels on both sides of P's boundary.
* `region_per_area`: the sum of U over the dilated P divided by the area of P: the uncertain
  area per predicted pixel, which grows as the relative boundary error (1 - Dice) does.

A structure predicted empty has no region: its region scores are +inf (most doubtful; for the
cup or gland of a case that has one, an empty prediction is a failure); so is `boundary_mean` of
a prediction covering the whole image, which has no boundary. A case's score, which
orders `review.csv`, is the largest of its structures' scores.

With labels, `detection_quality` says how well a score finds failing cases: the AUROC of the
score for "Dice below `fail_dice`" (per structure, and for "any structure fails" with the case
score) and the Spearman correlation of score and Dice (negative when the score works).

Which candidate is the default is chosen on source-validation data only, never on a target:
`choose_qc_score` ranks the candidates by their mean AUROC over structures on the source-
validation cases (the run's own `source_val` evaluators, whose predictions it saved), falling
back to the mean Spearman correlation (sign flipped) when no structure has both failing and
passing cases there, and to `FALLBACK_QC_SCORE` when neither is defined.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from scipy import stats

from puseg_jax import metrics
from puseg_jax.core.datasets import DatasetInfo
from puseg_jax.evaluators import scoring
from puseg_jax.evaluators.records import Predictions

QC_SCORES = ("image_mean", "region_mean", "boundary_mean", "region_per_area")
# When source validation cannot choose (no saved predictions, or no Dice spread): the case-mean
# uncertainty, the flag the project used before per-case QC existed.
FALLBACK_QC_SCORE = "image_mean"
# A structure "fails" below this Dice, unless the caller gives a threshold per structure.
DEFAULT_FAIL_DICE = 0.9
# The name of the "any structure fails" row of `detection_report`.
ANY = "any"


def structure_qc_scores(
    pred_masks: np.ndarray, uncertainty: np.ndarray, band: float
) -> dict[str, list[float]]:
    """Every candidate QC score of one case, per structure.

    Args:
      pred_masks: post-processed predictions [S, H, W] or [S, D, H, W] (bool).
      uncertainty: U in [0, 1], [H, W] or [D, H, W].
      band: dilation and boundary half-width in pixels of the grid.

    Returns:
      {candidate: [score of structure s for s in range(S)]}, +inf for the region scores of an
      empty prediction and for `boundary_mean` of one without a boundary.
    """
    pred_masks = np.asarray(pred_masks, bool)
    u = np.asarray(uncertainty, np.float64)
    if pred_masks.shape[1:] != u.shape:
        raise ValueError(f"masks {pred_masks.shape[1:]} and uncertainty {u.shape} differ")
    out: dict[str, list[float]] = {k: [] for k in QC_SCORES}
    image_mean = float(u.mean())
    for m in pred_masks:
        out["image_mean"].append(image_mean)
        if not m.any():
            for k in QC_SCORES[1:]:
                out[k].append(float("inf"))
            continue
        boundary = metrics.boundary_band(m, band)
        region = m | boundary  # P dilated by `band`: P and the band's outer half
        out["region_mean"].append(float(u[region].mean()))
        # A prediction that covers the whole image has no boundary in it: as degenerate as an
        # empty one.
        out["boundary_mean"].append(float(u[boundary].mean()) if boundary.any() else np.inf)
        out["region_per_area"].append(float(u[region].sum() / m.sum()))
    return out


def case_qc(
    pred: Predictions,
    info: DatasetInfo,
    config: ml_collections.ConfigDict,
    band: float | None = None,
) -> list[dict[str, Any]]:
    """QC scores of every case of a split's predictions.

    Args:
      pred: `predict.predict_split`'s output (probability, uncertainty, case_id, slice_index);
        labels are not read.
      info: the dataset family.
      config: the experiment config (the post-processing of `scoring.postprocess_case`).
      band: in network pixels; None takes `config.eval.boundary_width`.

    Returns:
      [{'case_id', 'scores': {candidate: {structure: score}}, 'pixels': {structure: predicted
      pixels on the network grid}}] in the order of `scoring.group_cases`.
    """
    band = config.eval.boundary_width if band is None else band
    rows = []
    for case_id, idx in scoring.group_cases(pred, info.volumetric):
        pm = scoring.postprocess_case(pred.probability[idx], info, config)
        unc = pred.uncertainty[idx]
        if not info.volumetric:
            pm, unc = pm[:, 0], unc[0]
        scores = structure_qc_scores(pm, unc, band)
        rows.append(
            {
                "case_id": case_id,
                "scores": {
                    k: dict(zip(info.structures, v, strict=True)) for k, v in scores.items()
                },
                "pixels": {s: int(pm[i].sum()) for i, s in enumerate(info.structures)},
            }
        )
    return rows


def case_score(structure_scores: Mapping[str, float]) -> float:
    """The score of a case: the most doubtful of its structures."""
    return float(max(structure_scores.values()))


def fail_thresholds(
    fail_dice: float | Mapping[str, float], structures: Sequence[str]
) -> dict[str, float]:
    """A threshold per structure from one number or a {structure: threshold} mapping.

    Raises:
      ValueError: a structure without a threshold, an unknown structure, or a value outside
        (0, 1].
    """
    if isinstance(fail_dice, Mapping):
        unknown = sorted(set(fail_dice) - set(structures))
        missing = [s for s in structures if s not in fail_dice]
        if unknown or missing:
            raise ValueError(
                f"Failure thresholds {dict(fail_dice)}: every structure of {tuple(structures)} "
                f"needs one (missing {missing}, unknown {unknown})"
            )
        out = {s: float(fail_dice[s]) for s in structures}
    else:
        out = {s: float(fail_dice) for s in structures}
    bad = {s: v for s, v in out.items() if not 0.0 < v <= 1.0}
    if bad:
        raise ValueError(f"Failure thresholds must lie in (0, 1], got {bad}")
    return out


def detection_quality(
    scores: Sequence[float], dice: Sequence[float], fail_dice: float
) -> dict[str, float | int]:
    """How well a score finds the cases whose Dice is below `fail_dice`.

    Args:
      scores: per case, higher = more doubtful (+inf allowed).
      dice: per case, the same order.
      fail_dice: a case fails when its Dice is below this.

    Returns:
      {'n', 'n_fail', 'auroc' (of the score for failure; NaN without both failing and passing
      cases), 'spearman' (of score and Dice; NaN when either is constant)}.
    """
    scores = np.asarray(scores, np.float64)
    dice = np.asarray(dice, np.float64)
    if scores.shape != dice.shape or scores.ndim != 1:
        raise ValueError(f"{scores.shape} scores but {dice.shape} Dice values")
    fail = dice < fail_dice
    spearman = float("nan")
    # Spearman on ranks: +inf scores rank highest, as they should.
    if len(scores) >= 2 and np.ptp(stats.rankdata(scores)) > 0 and np.ptp(dice) > 0:
        spearman = float(stats.spearmanr(scores, dice).statistic)
    return {
        "n": int(len(scores)),
        "n_fail": int(fail.sum()),
        "auroc": metrics.auroc(scores, fail),
        "spearman": spearman,
    }


def detection_report(
    qc_rows: Sequence[Mapping[str, Any]],
    dice: Mapping[str, Mapping[str, float]],
    score: str,
    thresholds: Mapping[str, float],
) -> dict[str, dict[str, float | int]]:
    """`detection_quality` of one candidate per structure, and for "any structure fails".

    Args:
      qc_rows: `case_qc` output.
      dice: {case_id: {structure: Dice}} of the same cases.
      score: the candidate.
      thresholds: `fail_thresholds` output.

    Returns:
      {structure: detection_quality, ..., 'any': detection_quality of the case score for a case
      failing in any structure (its 'dice' axis is the case's lowest Dice relative to its
      threshold, i.e. min_s Dice_s - threshold_s)}.
    """
    missing = [r["case_id"] for r in qc_rows if r["case_id"] not in dice]
    if missing:
        raise ValueError(f"No Dice for cases {missing[:5]}")
    out = {}
    for s, t in thresholds.items():
        out[s] = detection_quality(
            [r["scores"][score][s] for r in qc_rows], [dice[r["case_id"]][s] for r in qc_rows], t
        )
    margin = [min(dice[r["case_id"]][s] - t for s, t in thresholds.items()) for r in qc_rows]
    case_scores = [case_score(r["scores"][score]) for r in qc_rows]
    out[ANY] = detection_quality(case_scores, margin, 0.0)
    return out


def choose_qc_score(
    qc_rows: Sequence[Mapping[str, Any]],
    dice: Mapping[str, Mapping[str, float]],
    thresholds: Mapping[str, float],
    candidates: Sequence[str] = QC_SCORES,
) -> dict[str, Any]:
    """Picks the QC score that best finds failing cases, on the cases given: pass the
    source-validation cases only (a choice made on a target would be tuned on the test).

    The criterion is the mean over structures of the AUROC for failure (structures with both
    failing and passing cases); when no structure has both, the mean over structures of minus
    the Spearman correlation of score and Dice; ties go to the earlier candidate. When neither
    is defined (a single case, constant Dice), `FALLBACK_QC_SCORE` is taken.

    Args:
      qc_rows: `case_qc` output of the selection cases.
      dice: {case_id: {structure: Dice}} of those cases.
      thresholds: `fail_thresholds` output.
      candidates: the scores to choose from.

    Returns:
      {'score': the chosen candidate, 'criterion': 'auroc' | 'spearman' | 'fallback',
      'criterion_values': {candidate: mean AUROC or minus mean Spearman}, 'num_cases',
      'candidates': {candidate: {structure: detection_quality}}}.
    """
    reports = {c: detection_report(qc_rows, dice, c, thresholds) for c in candidates}

    def mean_of(c: str, key: str, sign: float) -> float:
        vals = [sign * reports[c][s][key] for s in thresholds]
        vals = [v for v in vals if np.isfinite(v)]
        return float(np.mean(vals)) if vals else float("nan")

    chosen, criterion, values = FALLBACK_QC_SCORE, "fallback", {}
    for key, sign in (("auroc", 1.0), ("spearman", -1.0)):
        values = {c: mean_of(c, key, sign) for c in candidates}
        finite = {c: v for c, v in values.items() if np.isfinite(v)}
        if finite:
            best = max(finite.values())
            chosen = next(c for c in candidates if finite.get(c) == best)
            criterion = key
            break
    return {
        "score": chosen,
        "criterion": criterion,
        "criterion_values": values,
        "num_cases": len(qc_rows),
        "candidates": reports,
    }
