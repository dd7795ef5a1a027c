"""How good the paired interval is, and how many seeds a planned comparison needs: synthetic
studies with a known effect, the coverage of intervals on them, and the power of the tables'
interval (`stats.split_t_interval`).

A study is an [S, n] table d = delta + a_s + b_i + e_si (`stats` module docstring) with spreads
measured from real records (`pooled_spreads`); `coverage` counts how often each interval holds
the truth, `power` how often the tables' interval excludes zero. docs/method.md reports both;
`python -m benchmarks.interval_coverage` regenerates its numbers from the screen's records.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

from puseg_jax.runs import stats

# An interval method for the simulation: (tables [K, S, n], rng, level) -> (lo [K], hi [K]).
IntervalFn = Callable[[np.ndarray, np.random.Generator, float], tuple[np.ndarray, np.ndarray]]


def satterthwaite_interval(
    diffs: np.ndarray, level: float = stats.LEVEL
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The same variance V1 + V2 as `stats.split_t_interval` with one t quantile on
    Satterthwaite's df (the alternative it replaces; it undercovers with S = 2).

    With the case part positive the df are Satterthwaite's for MS_seed + MS_case - MS_err; with
    it clipped, V is the per-seed-mean variance and the df are S - 1.

    Args:
      diffs: [..., S, n] complete tables, S >= 2.
      level: two-sided coverage.

    Returns:
      (mean, lo, hi, df), each of shape [...].
    """
    d = np.asarray(diffs, np.float64)
    num_seeds, num_cases = d.shape[-2:]
    ms = stats.anova_mean_squares(d)
    ms_s, ms_c, ms_e = ms["ms_seed"], ms["ms_case"], ms["ms_err"]
    df_s, df_c, df_e = num_seeds - 1, num_cases - 1, (num_seeds - 1) * (num_cases - 1)
    case_part = ms_c - ms_e
    clipped = case_part <= 0
    total = ms_s + np.where(clipped, 0.0, case_part)
    denom = np.where(clipped, ms_s**2 / df_s, ms_s**2 / df_s + ms_c**2 / df_c + ms_e**2 / df_e)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(denom > 0, total**2 / denom, float(df_s))
    # With a negative coefficient the df can fall below 1, where the quantile explodes for no
    # reason of the data.
    df = np.maximum(df, 1.0)
    se = np.sqrt(total / (num_seeds * num_cases))
    mean = d.mean(axis=(-2, -1))
    q = sps.t.ppf(0.5 + level / 2, df)
    return mean, mean - q * se, mean + q * se, df


def seed_t_interval(
    diffs: np.ndarray, level: float = stats.LEVEL
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """t interval over the S per-seed means (S - 1 df). Its estimand is delta + the mean case
    effect of these cases (the difference on this test set, averaged over seeds), not delta.

    Returns:
      (mean, lo, hi), each of shape [...].
    """
    seed_means = np.asarray(diffs, np.float64).mean(axis=-1)
    num_seeds = seed_means.shape[-1]
    mean = seed_means.mean(axis=-1)
    se = seed_means.std(axis=-1, ddof=1) / math.sqrt(num_seeds)
    q = sps.t.ppf(0.5 + level / 2, num_seeds - 1)
    return mean, mean - q * se, mean + q * se


def _drop_mean(fn: Callable[..., tuple]) -> IntervalFn:
    return lambda tables, rng, level: fn(tables, level)[1:3]


# The methods `coverage` scores by default; a caller adds others (a test, the old bootstrap).
INTERVAL_METHODS: dict[str, IntervalFn] = {
    stats.METHOD: _drop_mean(stats.split_t_interval),
    "anova_satterthwaite": _drop_mean(satterthwaite_interval),
    "seed_t": _drop_mean(seed_t_interval),
    "case_t": _drop_mean(stats.case_t_interval),
}


def pooled_spreads(tables: Sequence[np.ndarray]) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """The spreads of the model pooled over comparisons of the same S and n (moment estimates
    averaged), and the empirical pools `simulate_tables` can draw cases from.

    Args:
      tables: [S, n] difference tables (e.g. every variant minus its ablation on one target
        and structure); NaN cases are dropped (`stats.clean_table`).

    Returns:
      (spreads {'seed_sd', 'case_sd', 'inter_sd', 'seed_var', 'case_var', 'inter_var',
      'num_comparisons'}, case_pool [sum n]: each table's centred seed-averaged case
      differences, inter_scale_pool [sum n]: each case's interaction RMS over the tables,
      aligned with case_pool).
    """
    comps, case_pool, resid = [], [], []
    for d in tables:
        d, _ = stats.clean_table(d)
        comps.append(stats.variance_components(d))
        case_means = d.mean(axis=0)
        case_pool.append(case_means - case_means.mean())
        r = d - d.mean(axis=1, keepdims=True) - case_means + d.mean()
        # For large n, sum_s r_si^2 / (S - 1) estimates case i's interaction variance.
        resid.append((r**2).sum(axis=0) / (d.shape[0] - 1))
    var = {k: float(np.mean([c[k] for c in comps])) for k in ("seed_var", "case_var", "inter_var")}
    spreads = dict(
        seed_sd=math.sqrt(max(var["seed_var"], 0.0)),
        case_sd=math.sqrt(max(var["case_var"], 0.0)),
        inter_sd=math.sqrt(var["inter_var"]),
        num_comparisons=len(comps),
        **var,
    )
    scale = np.sqrt(np.mean(resid, axis=0))
    return spreads, np.concatenate(case_pool), np.tile(scale, len(comps))


def simulate_tables(
    rng: np.random.Generator,
    num_studies: int,
    num_seeds: int,
    num_cases: int,
    delta: float,
    seed_sd: float,
    case_sd: float,
    inter_sd: float,
    case_pool: np.ndarray | None = None,
    inter_scale_pool: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic studies d = delta + a_s + b_i + e_si with known truth.

    Gaussian by default. With `case_pool` (real case effects) each study draws its cases from
    the pool with replacement, rescaled to SD `case_sd`, which keeps the real skew and heavy
    tails. With `inter_scale_pool` (each pool case's interaction SD in the real data) the
    interaction of a drawn case is normal with that case's SD, rescaled to RMS `inter_sd`:
    cases that flip between seeds keep doing so.

    Args:
      rng: random generator.
      num_studies: K studies.
      num_seeds, num_cases: S and n of each study.
      delta: the true effect.
      seed_sd, case_sd, inter_sd: the spreads of a, b and e.
      case_pool: [m] real case effects, or None for normal ones.
      inter_scale_pool: [m] per-case interaction SDs aligned with `case_pool`, or None.

    Returns:
      (tables [K, S, n], the truth of a these-cases estimand [K]: delta + mean of the b drawn).
    """
    a = seed_sd * rng.standard_normal((num_studies, num_seeds, 1))
    e_scale = np.ones((num_studies, 1, num_cases))
    if case_pool is None:
        b = case_sd * rng.standard_normal((num_studies, 1, num_cases))
    else:
        pool = np.asarray(case_pool, np.float64)
        pool = pool - pool.mean()
        pool = pool / pool.std() if pool.std() > 0 else pool
        pick = rng.integers(0, pool.size, size=(num_studies, 1, num_cases))
        b = case_sd * pool[pick]
        if inter_scale_pool is not None:
            scales = np.asarray(inter_scale_pool, np.float64)
            e_scale = (scales / math.sqrt(np.mean(scales**2)))[pick]
    e = inter_sd * e_scale * rng.standard_normal((num_studies, num_seeds, num_cases))
    return delta + a + b + e, delta + b.mean(axis=(-2, -1))


def coverage(
    num_seeds: int,
    num_cases: int,
    delta: float,
    seed_sd: float,
    case_sd: float,
    inter_sd: float,
    num_studies: int = 2000,
    seed: int = 0,
    case_pool: np.ndarray | None = None,
    inter_scale_pool: np.ndarray | None = None,
    level: float = stats.LEVEL,
    methods: Mapping[str, IntervalFn] | None = None,
) -> dict[str, dict[str, float]]:
    """Empirical coverage of interval methods on simulated studies.

    Each method is scored against two estimands: 'delta' (a new case, a new seed: what the
    tables claim) and 'these_cases' (delta + the mean case effect of the study's cases).

    Args:
      num_seeds, num_cases, delta, seed_sd, case_sd, inter_sd, case_pool, inter_scale_pool:
        the studies (`simulate_tables`).
      num_studies: K.
      seed: of the simulation (the methods draw from the same generator after the tables).
      level: nominal two-sided coverage.
      methods: {name: IntervalFn}; default `INTERVAL_METHODS`.

    Returns:
      {method: {'delta', 'delta_se', 'these_cases', 'these_cases_se', 'mean_width'}}, the
      *_se being the Monte-Carlo standard errors sqrt(p (1 - p) / K).
    """
    rng = np.random.default_rng(seed)
    tables, truth_cases = simulate_tables(
        rng, num_studies, num_seeds, num_cases, delta, seed_sd, case_sd, inter_sd,
        case_pool, inter_scale_pool,
    )  # fmt: skip
    out = {}
    for name, fn in (INTERVAL_METHODS if methods is None else methods).items():
        lo, hi = fn(tables, rng, level)
        res = {}
        for est, truth in (("delta", delta), ("these_cases", truth_cases)):
            p = float(np.mean((lo <= truth) & (truth <= hi)))
            res[est] = p
            res[f"{est}_se"] = math.sqrt(p * (1 - p) / num_studies)
        res["mean_width"] = float(np.mean(hi - lo))
        out[name] = res
    return out


def power(
    num_seeds: int,
    num_cases: int,
    delta: float,
    seed_sd: float,
    case_sd: float,
    inter_sd: float,
    num_studies: int = 4000,
    seed: int = 0,
    case_pool: np.ndarray | None = None,
    inter_scale_pool: np.ndarray | None = None,
    level: float = stats.LEVEL,
) -> tuple[float, float]:
    """Power of the tables' interval: the share of simulated studies whose interval excludes
    zero on the side of `delta` (a 'better' verdict for delta > 0).

    Returns:
      (power, its Monte-Carlo SE).
    """
    rng = np.random.default_rng(seed)
    tables, _ = simulate_tables(
        rng, num_studies, num_seeds, num_cases, delta, seed_sd, case_sd, inter_sd,
        case_pool, inter_scale_pool,
    )  # fmt: skip
    _, lo, hi = stats.split_t_interval(tables, level)
    p = float(np.mean(lo > 0 if delta >= 0 else hi < 0))
    return p, math.sqrt(p * (1 - p) / num_studies)


def seeds_for_power(
    num_cases: int,
    delta: float,
    seed_sd: float,
    case_sd: float,
    inter_sd: float,
    target_power: float = 0.8,
    max_seeds: int = 30,
    **kwargs: Any,
) -> tuple[int | None, dict[int, float]]:
    """The smallest number of seeds per arm whose simulated power reaches `target_power`.

    Args:
      num_cases, delta, seed_sd, case_sd, inter_sd: the planned comparison (`power`).
      target_power: e.g. 0.8.
      max_seeds: give up above this.
      **kwargs: passed to `power` (num_studies, seed, pools, level).

    Returns:
      (S, or None if none up to `max_seeds`; {S: power} for every S tried).
    """
    tried = {}
    for s in range(2, max_seeds + 1):
        p, _ = power(s, num_cases, delta, seed_sd, case_sd, inter_sd, **kwargs)
        tried[s] = p
        if p >= target_power:
            return s, tried
    return None, tried
