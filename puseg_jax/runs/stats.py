"""Statistics over seeds and cases: bootstrap intervals, paired comparisons and their verdict."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from puseg_jax.runs.run_folder import RunFolder

BOOTSTRAP_SAMPLES = 10_000

# ---------------------------------------------------------------------------------------------
# Aggregation.


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (0 for one value) of the finite values, and their
    number; NaN values are left out (the count says how many were kept)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return float(v.mean()), std, int(v.size)


def target_eval(summary: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The (name, results) of the summary's target evaluator (there is exactly one)."""
    found = [(n, e) for n, e in summary["evals"].items() if e.get("role") == "target"]
    if len(found) != 1:
        raise ValueError(f"expected one target evaluator, found {[n for n, _ in found]}")
    return found[0]


def read_per_case(workdir: str | Path, eval_name: str) -> dict[tuple[str, str], float]:
    """{(case_id, structure): Dice} of an evaluator's per-case table (`RunFolder.per_case`)."""
    per_case = RunFolder(workdir).per_case(eval_name)
    return {(c, s): m["dice"] for c, row in per_case.items() for s, m in row.items()}


def bootstrap_interval(
    values: np.ndarray, num_samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of `values` (resampled with replacement)."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(num_samples, values.size))
    means = values[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def hierarchical_bootstrap_interval(
    diffs: np.ndarray, num_samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Two-level percentile bootstrap 95% interval of the mean of a [seeds, cases] array.

    Each resample draws the seeds with replacement, then, within each drawn seed, the cases with
    replacement, and takes the mean of everything drawn. Both sources of variation count: a gain
    carried by one seed gives an interval as wide as the disagreement between seeds, where a
    bootstrap over seed-averaged cases would call it certain. With one seed it is the bootstrap
    over cases.

    Args:
      diffs: [S, C] per-seed, per-case values (e.g. Dice differences of paired runs).
      num_samples: resamples.
      seed: of the resampling.

    Returns:
      (lo, hi); NaN for an empty array.
    """
    diffs = np.asarray(diffs, np.float64)
    if diffs.ndim != 2:
        raise ValueError(f"expected a [seeds, cases] array, got shape {diffs.shape}")
    if diffs.size == 0:
        return float("nan"), float("nan")
    num_seeds, num_cases = diffs.shape
    rng = np.random.default_rng(seed)
    means = np.empty(num_samples)
    # In chunks: [chunk, S, C] indices stay a few tens of MB for thousands of cases.
    chunk = max(1, 2_000_000 // (num_seeds * num_cases))
    for start in range(0, num_samples, chunk):
        n = min(chunk, num_samples - start)
        seed_idx = rng.integers(0, num_seeds, size=(n, num_seeds, 1))
        case_idx = rng.integers(0, num_cases, size=(n, num_seeds, num_cases))
        means[start : start + n] = diffs[seed_idx, case_idx].mean(axis=(1, 2))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def verdict(ci95: tuple[float, float]) -> str:
    """'better' / 'worse' when the interval excludes zero, else 'no difference shown'."""
    lo, hi = ci95
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "no difference shown"


def paired_comparison(
    runs: list[dict[str, Any]], method: str = "ours", baseline: str = "erm"
) -> list[dict[str, Any]]:
    """Per target and structure: per-case target Dice of `method` minus `baseline`.

    `method` and `baseline` are variant names (a plain method name is its variant without
    overrides). Runs are paired by seed (same data order and initialisation) and by case; the
    interval is the two-level bootstrap over seeds and cases (`hierarchical_bootstrap_interval`).

    Returns:
      Rows with 'target', 'structure', 'method', 'baseline', 'num_cases', 'seeds',
      'mean_diff', 'seed_diffs' (mean difference of each seed), 'ci95' (lo, hi), 'verdict' and
      'wins' (cases where `method` is better, on seed-averaged differences).
    """
    by_key = {(r["target"], r["variant"], r["seed"]): r for r in runs}
    out = []
    for target in sorted({r["target"] for r in runs}):
        seeds = sorted(
            s for (t, v, s) in by_key if t == target and v == method and (t, baseline, s) in by_key
        )
        if not seeds:
            continue
        per_seed: list[dict[tuple[str, str], float]] = []
        for seed in seeds:
            a, b = by_key[(target, method, seed)], by_key[(target, baseline, seed)]
            dice_a = read_per_case(a["workdir"], target_eval(a["summary"])[0])
            dice_b = read_per_case(b["workdir"], target_eval(b["summary"])[0])
            if set(dice_a) != set(dice_b) or (per_seed and set(dice_a) != set(per_seed[0])):
                raise ValueError(
                    f"{a['workdir']} and {b['workdir']} report different cases; cannot pair them"
                )
            per_seed.append({k: dice_a[k] - dice_b[k] for k in dice_a})
        for s in a["summary"]["structures"]:
            keys = sorted(k for k in per_seed[0] if k[1] == s)
            d = np.array([[diffs[k] for k in keys] for diffs in per_seed])  # [seeds, cases]
            ci = hierarchical_bootstrap_interval(d)
            out.append(
                dict(
                    target=target,
                    structure=s,
                    method=method,
                    baseline=baseline,
                    num_cases=len(keys),
                    seeds=seeds,
                    mean_diff=float(d.mean()) if d.size else float("nan"),
                    seed_diffs=[float(x) for x in d.mean(axis=1)],
                    ci95=ci,
                    verdict=verdict(ci),
                    wins=int(np.sum(d.mean(axis=0) > 0)),
                )
            )
    return out
