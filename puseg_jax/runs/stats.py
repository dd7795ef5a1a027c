"""Statistics over seeds and cases: the paired interval of a comparison and its verdict.

The data of one comparison is `d[s, i] = A - B`, the per-case target Dice difference of the
runs of variants A and B trained with seed s, scored on case i; every seed scores the same
cases. The model behind the interval (a two-way random-effects layout without replication):

    d[s, i] = delta + a_s + b_i + e_si,
    a_s ~ (0, sigma_seed^2)   what the seed does to the difference (init, data order),
    b_i ~ (0, sigma_case^2)   how much more (or less) A gains on case i than on average,
    e_si ~ (0, sigma_inter^2) the case-by-seed interaction (a case that flips between seeds).

The estimand is delta: the expected Dice difference on a new case of the target domain (drawn
like its test cases) for a new training seed. The grand mean of the S x n table has
Var(mean) = sigma_seed^2 / S + sigma_case^2 / n + sigma_inter^2 / (S n), in two independent
parts: V1 = MS_seed / (S n) estimates Var(a-bar + e-bar) on S - 1 df, and
V2 = max(MS_case - MS_err, 0) / (S n) estimates Var(b-bar) on about n - 1 df. The interval is
mean +- sqrt(t_{S-1}^2 V1 + t_{n-1}^2 V2) (`split_t_interval`): each part with its own t
quantile (after Graybill and Wang's modified large-sample intervals). With no case part it is
the t interval over the S seed means. Satterthwaite's single quantile on pooled df
(`satterthwaite_interval`, kept for the simulation) undercovers with S = 2: when the 1-df
MS_seed comes out small its df jump towards n - 1. docs/method.md has the simulated coverage
(`puseg_jax.runs.power`).
"""

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from puseg_jax.runs.run_folder import RunFolder

LEVEL = 0.95

# The interval of the tables (`split_t_interval`); its name is written beside each row.
METHOD = "anova_split_t"
ONE_SEED = "one seed: no verdict"

ESTIMAND_DELTA = (
    "delta: the expected per-case Dice difference A - B on a new case of the target domain "
    "for a new training seed (seed, case and interaction spreads all count)"
)
ESTIMAND_ONE_SEED = (
    "delta + a_1: the difference of this one seed on a new case; seed-to-seed noise is NOT "
    "covered (one seed gives no estimate of it)"
)

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


# ---------------------------------------------------------------------------------------------
# The paired interval. The batch functions take [..., S, n] tables so the simulation
# (`puseg_jax.runs.power`) scores the very code the tables use.


def clean_table(diffs: np.ndarray) -> tuple[np.ndarray, int]:
    """Drops the cases (columns) that are not finite in every seed.

    The layout needs every case in every seed: a case scored in one seed only would weigh on
    the seed means and the case means unevenly. Dropping it loses little (one case of 50-80),
    and the count is reported beside the interval.

    Args:
      diffs: [S, n] per-seed, per-case differences; NaN/inf where a case has no score.

    Returns:
      (the [S, n'] table of the cases finite in every seed, the number of cases dropped).
    """
    diffs = np.asarray(diffs, np.float64)
    if diffs.ndim != 2:
        raise ValueError(f"expected a [seeds, cases] array, got shape {diffs.shape}")
    keep = np.all(np.isfinite(diffs), axis=0)
    return diffs[:, keep], int(np.sum(~keep))


def anova_mean_squares(diffs: np.ndarray) -> dict[str, np.ndarray]:
    """The two-way (seed x case) ANOVA mean squares of one table or a batch of tables.

    Args:
      diffs: [..., S, n] with S >= 2 and n >= 2, all finite.

    Returns:
      {'ms_seed', 'ms_case', 'ms_err'} of shape [...], on S - 1, n - 1 and (S - 1)(n - 1) df.
    """
    d = np.asarray(diffs, np.float64)
    num_seeds, num_cases = d.shape[-2:]
    if num_seeds < 2 or num_cases < 2:
        raise ValueError(f"need at least 2 seeds and 2 cases, got {num_seeds} x {num_cases}")
    grand = d.mean(axis=(-2, -1), keepdims=True)
    seed_means = d.mean(axis=-1, keepdims=True)
    case_means = d.mean(axis=-2, keepdims=True)
    ss_seed = num_cases * np.sum((seed_means - grand) ** 2, axis=(-2, -1))
    ss_case = num_seeds * np.sum((case_means - grand) ** 2, axis=(-2, -1))
    ss_err = np.sum((d - seed_means - case_means + grand) ** 2, axis=(-2, -1))
    return dict(
        ms_seed=ss_seed / (num_seeds - 1),
        ms_case=ss_case / (num_cases - 1),
        ms_err=ss_err / ((num_seeds - 1) * (num_cases - 1)),
    )


def variance_components(diffs: np.ndarray) -> dict[str, float]:
    """Method-of-moments spreads of d = delta + a_s + b_i + e_si.

    Args:
      diffs: [S, n], S >= 2, finite.

    Returns:
      {'seed_sd', 'case_sd', 'inter_sd'} (a negative variance estimate gives SD 0),
      {'seed_var', 'case_var', 'inter_var'} (the raw moment estimates, possibly negative) and
      the mean squares {'ms_seed', 'ms_case', 'ms_err'}.
    """
    num_seeds, num_cases = np.shape(diffs)
    ms = {k: float(v) for k, v in anova_mean_squares(diffs).items()}
    seed_var = (ms["ms_seed"] - ms["ms_err"]) / num_cases
    case_var = (ms["ms_case"] - ms["ms_err"]) / num_seeds
    inter_var = ms["ms_err"]
    return dict(
        seed_sd=math.sqrt(max(seed_var, 0.0)),
        case_sd=math.sqrt(max(case_var, 0.0)),
        inter_sd=math.sqrt(inter_var),
        seed_var=seed_var,
        case_var=case_var,
        inter_var=inter_var,
        **ms,
    )


def split_t_interval(
    diffs: np.ndarray, level: float = LEVEL
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The interval of the tables for delta: mean +- sqrt(t_{S-1}^2 V1 + t_{n-1}^2 V2).

    mean - delta = (a-bar + e-bar) + b-bar. The first part has variance (sigma_seed^2 +
    sigma_inter^2 / n) / S, estimated by V1 = MS_seed / (S n) on S - 1 df; the second,
    independent of it, sigma_case^2 / n, estimated by V2 = max(MS_case - MS_err, 0) / (S n) on
    about n - 1 df. Exact t_{S-1} when the case part is nil, the case t when the seed part is,
    and never the large df Satterthwaite's formula gives when a 1-df MS_seed comes out small.

    Args:
      diffs: [..., S, n] complete tables, S >= 2, n >= 2.
      level: two-sided coverage.

    Returns:
      (mean, lo, hi), each of shape [...].
    """
    d = np.asarray(diffs, np.float64)
    num_seeds, num_cases = d.shape[-2:]
    ms = anova_mean_squares(d)
    v1 = ms["ms_seed"] / (num_seeds * num_cases)
    v2 = np.maximum(ms["ms_case"] - ms["ms_err"], 0.0) / (num_seeds * num_cases)
    q1 = sps.t.ppf(0.5 + level / 2, num_seeds - 1)
    q2 = sps.t.ppf(0.5 + level / 2, num_cases - 1)
    half = np.sqrt(q1**2 * v1 + q2**2 * v2)
    mean = d.mean(axis=(-2, -1))
    return mean, mean - half, mean + half


def case_t_interval(
    diffs: np.ndarray, level: float = LEVEL
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """t interval over the n seed-averaged case differences (n - 1 df).

    The seed noise counts only through the interaction, so with several seeds it is too narrow
    for delta whenever seeds disagree (what a bootstrap over seed-averaged cases does). With one
    seed it is all there is, and it covers that seed's difference only (`ESTIMAND_ONE_SEED`).

    Args:
      diffs: [..., S, n], n >= 2.
      level: two-sided coverage.

    Returns:
      (mean, lo, hi), each of shape [...].
    """
    case_means = np.asarray(diffs, np.float64).mean(axis=-2)
    num_cases = case_means.shape[-1]
    mean = case_means.mean(axis=-1)
    se = case_means.std(axis=-1, ddof=1) / math.sqrt(num_cases)
    q = sps.t.ppf(0.5 + level / 2, num_cases - 1)
    return mean, mean - q * se, mean + q * se


def paired_interval(diffs: np.ndarray, level: float = LEVEL) -> dict[str, Any]:
    """The interval of a comparison's mean difference, for the tables.

    With S >= 2 seeds: `split_t_interval`, an interval for delta. With one seed there is no
    estimate of the seed-to-seed spread: the t interval over the cases is returned and flagged
    (`covers_seed_noise` False); a table must not read it as a verdict about the method.

    Args:
      diffs: [S, n] per-seed, per-case differences A - B, runs paired by seed; NaN where a case
        has no score (such cases are dropped from every seed and counted).
      level: two-sided coverage.

    Returns:
      {'mean', 'ci' (lo, hi), 'se' (of the mean, sqrt(V1 + V2)), 'method', 'estimand',
      'covers_seed_noise', 'num_seeds', 'num_cases' (kept), 'dropped_cases', 'seed_means',
      'components' (`variance_components`, None for one seed), 'level'}; NaN interval and
      method 'none' with fewer than 2 cases left.
    """
    clean, dropped = clean_table(diffs)
    num_seeds, num_cases = clean.shape
    nan = float("nan")
    out: dict[str, Any] = dict(
        num_seeds=num_seeds,
        num_cases=num_cases,
        dropped_cases=dropped,
        seed_means=[float(x) for x in clean.mean(axis=1)] if num_cases else [nan] * num_seeds,
        level=level,
        components=None,
        mean=float(clean.mean()) if clean.size else nan,
        ci=(nan, nan),
        se=nan,
        method="none",
        estimand="",
        covers_seed_noise=False,
    )
    if num_seeds == 0 or num_cases < 2:
        return out
    if num_seeds == 1:
        _, lo, hi = case_t_interval(clean, level)
        return dict(
            out,
            ci=(float(lo), float(hi)),
            se=float(clean.std(ddof=1) / math.sqrt(num_cases)),
            method="case_t (one seed)",
            estimand=ESTIMAND_ONE_SEED,
        )
    _, lo, hi = split_t_interval(clean, level)
    comps = variance_components(clean)
    v1 = comps["ms_seed"] / (num_seeds * num_cases)
    v2 = max(comps["ms_case"] - comps["ms_err"], 0.0) / (num_seeds * num_cases)
    return dict(
        out,
        ci=(float(lo), float(hi)),
        # The SE of the mean; the interval is not mean +- q * se with one q (see the module).
        se=math.sqrt(v1 + v2),
        method=METHOD,
        estimand=ESTIMAND_DELTA,
        covers_seed_noise=True,
        components=comps,
    )


def verdict(ci: tuple[float, float]) -> str:
    """'better' / 'worse' when the interval excludes zero, else 'no difference shown'."""
    lo, hi = ci
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "no difference shown"


def interval_verdict(interval: dict[str, Any]) -> str:
    """The verdict of a `paired_interval`: none from one seed or without an interval."""
    if interval["method"] == "none":
        return "no interval (fewer than 2 cases)"
    if not interval["covers_seed_noise"]:
        return ONE_SEED
    return verdict(interval["ci"])


def paired_comparison(
    runs: list[dict[str, Any]], method: str = "ours", baseline: str = "erm"
) -> list[dict[str, Any]]:
    """Per target and structure: per-case target Dice of `method` minus `baseline`.

    `method` and `baseline` are variant names (a plain method name is its variant without
    overrides). Runs are paired by seed (same data order and initialisation) and by case; the
    interval is `paired_interval` (split t over seeds and cases; one seed: a case-level
    interval and no verdict).

    Returns:
      Rows with 'target', 'structure', 'method', 'baseline', 'num_cases' (scored in every seed),
      'dropped_cases' (NaN in some seed), 'seeds', 'mean_diff', 'seed_diffs' (mean difference of
      each seed), 'ci95' (lo, hi), 'se', 'interval' (its method), 'verdict' and 'wins' (cases
      where `method` is better, on seed-averaged differences).
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
            d = np.array([[diffs[k] for k in keys] for diffs in per_seed]).reshape(len(seeds), -1)
            interval = paired_interval(d)
            out.append(
                dict(
                    target=target,
                    structure=s,
                    method=method,
                    baseline=baseline,
                    num_cases=interval["num_cases"],
                    dropped_cases=interval["dropped_cases"],
                    seeds=seeds,
                    mean_diff=interval["mean"],
                    seed_diffs=interval["seed_means"],
                    ci95=interval["ci"],
                    se=interval["se"],
                    interval=interval["method"],
                    verdict=interval_verdict(interval),
                    wins=int(np.sum(clean_table(d)[0].mean(axis=0) > 0)),
                )
            )
    return out
