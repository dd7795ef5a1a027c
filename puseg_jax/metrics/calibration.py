"""Quality of pixel-wise probabilities: calibration (reliability bins, ECE), Brier score, NLL
and the AUROC of uncertainty for errors."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# Default clipping of probabilities inside logarithms: small enough not to bias well-calibrated
# predictions, large enough that a confident mistake costs a finite -log(1e-7) ~= 16.1 nats.
NLL_EPS = 1e-7

# ---------------------------------------------------------------------------------------------
# Quality of pixel-wise uncertainty. Inputs may be millions of pixels pooled from many cases, so
# everything is vectorised.
# ---------------------------------------------------------------------------------------------


def _right_closed_bin(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Index b of the bin (edges[b], edges[b + 1]] holding each value of [0, 1] (0 goes to bin 0),
    for equal-width edges. Same result as np.searchsorted(edges[1:-1], values) but ~4x faster on
    millions of values: a floor, then a one-bin correction where rounding of values * n_bins
    crossed an edge (it cannot cross more than one)."""
    n_bins = edges.size - 1
    index = np.minimum((values * n_bins).astype(np.intp), n_bins - 1)
    index -= (values <= edges[index]) & (index > 0)
    index += (values > edges[index + 1]) & (index < n_bins - 1)
    return index


def calibration_sums(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15
) -> dict[str, np.ndarray]:
    """Per-bin sums of a reliability diagram; sums of several sets of predictions (added key by
    key) give the calibration of their union, so large sets are scored in parts
    (`calibration_from_sums` turns them into the ECE and the diagram).

    Bins are ``n_bins`` equal-width intervals of [0, 1], closed on the right:
    bin b holds confidences in ``(b / n_bins, (b + 1) / n_bins]`` and the first bin also holds 0.

    Args:
      confidence: confidence of each prediction in [0, 1], any shape (e.g. the maximum softmax
        probability of every pixel of every case, flattened or not).
      correct: whether each prediction is right (bool or 0/1), same shape.
      n_bins: number of bins.

    Returns:
      ``{"bin_counts": (n_bins,) int64, "bin_confidence_sum": (n_bins,), "bin_correct_sum":
      (n_bins,)}``.
    """
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    correct = np.asarray(correct).ravel()
    if confidence.shape != correct.shape:
        raise ValueError(f"{confidence.size} confidences but {correct.size} correctness values")
    # min/max are NaN if any value is, and NaN fails both comparisons.
    if confidence.size and not (confidence.min() >= 0.0 and confidence.max() <= 1.0):
        raise ValueError("confidence must lie in [0, 1]")
    bin_index = _right_closed_bin(confidence, _bin_edges(n_bins))
    return {
        "bin_counts": np.bincount(bin_index, minlength=n_bins).astype(np.int64),
        "bin_confidence_sum": np.bincount(bin_index, weights=confidence, minlength=n_bins),
        "bin_correct_sum": np.bincount(
            bin_index, weights=correct.astype(np.float64), minlength=n_bins
        ),
    }


def _bin_edges(n_bins: int) -> np.ndarray:
    # Edges as exact quotients, so that a confidence equal to b / n_bins lands in bin b - 1.
    return np.arange(n_bins + 1, dtype=np.float64) / n_bins


def calibration_from_sums(sums: Mapping[str, np.ndarray]) -> dict[str, float | np.ndarray]:
    """Expected calibration error and reliability-diagram data from `calibration_sums` (of one
    set of predictions, or added over several).

    ECE is ``sum_b (count_b / N) * |accuracy_b - mean_confidence_b|``.

    Args:
      sums: the output of `calibration_sums`, or several of them added key by key.

    Returns:
      ``{"ece": float, "bin_edges": (n_bins + 1,), "bin_confidence": (n_bins,),
      "bin_accuracy": (n_bins,), "bin_counts": (n_bins,) int64}``; per-bin means are NaN for
      empty bins (nothing to plot there), which do not contribute to the ECE. The ECE is NaN
      only when there is no prediction at all.
    """
    counts = np.asarray(sums["bin_counts"], np.int64)
    confidence_sum = np.asarray(sums["bin_confidence_sum"], np.float64)
    correct_sum = np.asarray(sums["bin_correct_sum"], np.float64)
    total = int(counts.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_confidence = confidence_sum / counts
        bin_accuracy = correct_sum / counts
    if total == 0:
        ece = float("nan")
    else:
        # |sum(correct) - sum(confidence)| / N per bin is count-weighted |acc - conf|, with no
        # division by empty counts.
        ece = float(np.sum(np.abs(correct_sum - confidence_sum)) / total)
    return {
        "ece": ece,
        "bin_edges": _bin_edges(counts.size),
        "bin_confidence": bin_confidence,
        "bin_accuracy": bin_accuracy,
        "bin_counts": counts,
    }


def _split_target(probs: np.ndarray, target: np.ndarray) -> str:
    """Tells the softmax form (labels one axis short of probs) from the binary form."""
    if target.shape == probs.shape:
        return "binary"
    if target.shape == probs.shape[:-1]:
        if not np.issubdtype(target.dtype, np.integer):
            raise ValueError(f"softmax form needs integer labels, got dtype {target.dtype}")
        return "softmax"
    raise ValueError(
        f"target shape {target.shape} fits neither probs {probs.shape} (binary form) "
        f"nor probs.shape[:-1] (softmax form)"
    )


def _reduce(values: np.ndarray, reduction: str) -> float:
    if reduction == "mean":
        return float(np.mean(values))
    if reduction == "sum":  # to add over several sets of pixels and divide once
        return float(np.sum(values))
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def brier_score(probs: np.ndarray, target: np.ndarray, reduction: str = "mean") -> float:
    """Brier score, averaged over pixels.

    Two forms, told apart by the shapes:

    * softmax: `probs` (..., K) class probabilities and `target` (...) integer labels in [0, K);
      the score is ``mean over pixels of sum_k (probs_k - onehot_k) ** 2``, in [0, 2]. For a
      one-hot target, pass ``target.argmax(-1)``.
    * binary: `probs` (...) foreground probabilities and `target` (...) bool (or 0/1) of the same
      shape; the score is ``mean((probs - target) ** 2)``, in [0, 1], which is half the softmax
      form of the equivalent two-class problem.

    Args:
      probs: probabilities, see above.
      target: labels, see above.
      reduction: 'mean' over pixels (the score), or 'sum' (the numerator of the mean: the
        binary form averages over every element of `probs`, the softmax form over `target`'s).

    Returns:
      The Brier score (lower is better).
    """
    probs, target = np.asarray(probs), np.asarray(target)
    if _split_target(probs, target) == "binary":
        return _reduce((probs.astype(np.float64) - target.astype(np.float64)) ** 2, reduction)
    labels = target.astype(np.intp)
    p_true = np.take_along_axis(probs, labels[..., None], axis=-1)[..., 0].astype(np.float64)
    # sum_k (p_k - y_k)^2 = sum_k p_k^2 - 2 p_true + 1; avoids materialising a one-hot array.
    sum_squares = np.einsum("...k,...k->...", probs, probs, dtype=np.float64)
    return _reduce(sum_squares - 2.0 * p_true + 1.0, reduction)


def nll(
    probs: np.ndarray, target: np.ndarray, eps: float = NLL_EPS, reduction: str = "mean"
) -> float:
    """Negative log-likelihood (natural log), averaged over pixels.

    Forms as in ``brier_score``: softmax (`probs` (..., K), integer `target` (...)), where the
    score is ``-mean(log(clip(probs[target], eps, 1)))``; or binary (`probs` and bool `target` of
    the same shape), where it is ``-mean(log(clip(p, eps, 1)))`` with ``p = probs`` on
    foreground pixels and ``1 - probs`` on background ones (binary cross-entropy).

    Args:
      probs: probabilities, see above.
      target: labels, see above.
      eps: probabilities of the true class are clipped below at `eps` (default 1e-7) so that a
        confident mistake costs a finite ``-log(eps)`` (about 16.1 nats) instead of infinity.
      reduction: 'mean' over pixels, or 'sum' (see `brier_score`).

    Returns:
      The mean negative log-likelihood in nats (lower is better).
    """
    probs, target = np.asarray(probs), np.asarray(target)
    if _split_target(probs, target) == "binary":
        p_fg = probs.astype(np.float64)
        p_true = np.where(target.astype(bool), p_fg, 1.0 - p_fg)
    else:
        labels = target.astype(np.intp)
        p_true = np.take_along_axis(probs, labels[..., None], axis=-1)[..., 0].astype(np.float64)
    return -_reduce(np.log(np.clip(p_true, eps, 1.0)), reduction)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, from ranks (the Mann-Whitney U statistic).

    AUROC is the probability that a random positive scores higher than a random negative, a tie
    counting one half: ``(#{s+ > s-} + #{s+ == s-} / 2) / (n_pos * n_neg)``. It is computed exactly,
    in integer arithmetic, from one sort per class and a binary search of each positive among the
    negatives (no loop over pixels).

    Args:
      scores: any shape; higher means "more likely positive" (e.g. uncertainty, to detect
        errors). Must not contain NaN.
      labels: bool or 0/1 of the same shape (e.g. the pixel is misclassified).

    Returns:
      AUROC in [0, 1]; NaN only when one class is absent (the area is undefined then).
    """
    scores = np.asarray(scores).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    if np.issubdtype(scores.dtype, np.floating) and np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    n_pos = int(np.count_nonzero(labels))
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Sorting each class once and counting, for every positive, the negatives below it and tied
    # with it is exact and, unlike ranking all scores with argsort, uses NumPy's fast plain sort.
    negatives = np.sort(scores[~labels])
    positives = np.sort(scores[labels])  # sorted queries make searchsorted cache-friendly
    below = np.searchsorted(negatives, positives, side="left")
    not_above = np.searchsorted(negatives, positives, side="right")
    # Twice the U statistic, to stay in integers: 2 * wins + ties.
    twice_u = int(below.sum(dtype=np.int64)) + int(not_above.sum(dtype=np.int64))
    return twice_u / (2.0 * n_pos * n_neg)
