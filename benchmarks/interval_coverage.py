"""The coverage and power numbers of docs/method.md ("Intervals with few seeds"), from the
screen's records: spreads measured per target and structure, then simulated studies.

    python -m benchmarks.interval_coverage [--root docs/results/fundus_highlight_screen_h200]
        [--studies 4000] [--out benchmarks/interval_coverage.json]

Spreads: for each target (Domain1, Domain3) and structure (OD, OC), every screened variant of
`ours` minus `ours_no_highlight`, per seed and case (2 seeds), gives an [S, n] table; the moment
estimates of the seed, case and interaction variances are averaged over the six tables
(`power.pooled_spreads`), and the tables' case effects and per-case interaction SDs are kept as
empirical pools. Coverage of nominal 95% intervals at S = 2, 3, 5, delta = 0 and 0.02, in three
settings: Gaussian at the measured spreads, cases drawn from the empirical pools (heavy tails,
heteroscedastic interaction), and a stress test with the case SD raised to the interaction SD.
Then the power of the tables' interval for delta = 0.02 on Domain1 (51 cases), S = 2..10.
Prints markdown and writes the numbers to --out. About 100 s on one core.
"""

import argparse
import json
import math
import time

import numpy as np

from puseg_jax.runs import power, stats, tables

TARGETS = {"Domain1": 51, "Domain3": 83}
STRUCTURES = ("OD", "OC")
BASELINE = "ours_no_highlight"
SCENARIOS = ("gaussian", "empirical", "case_heavy")
NAMES = {
    stats.METHOD: "split t (the tables')",
    "anova_satterthwaite": "Satterthwaite",
    "seed_t": "t over seed means",
    "case_t": "t over cases",
    "old_bootstrap": "old 2-level bootstrap",
}


def old_bootstrap(tables_, rng, level, num_samples=1000):
    """The two-level percentile bootstrap the tables used before issue 20 (seeds, then cases
    within each drawn seed), with each seed's case-resample mean drawn from its normal limit
    (tests/test_stats.py checks it against the exact resampling). Only for the comparison."""
    num_studies, num_seeds, num_cases = tables_.shape
    seed_means = tables_.mean(axis=-1)
    seed_se = tables_.std(axis=-1) / math.sqrt(num_cases)
    lo, hi = np.empty(num_studies), np.empty(num_studies)
    tail = 50 * (1 - level)
    chunk = max(1, 4_000_000 // (num_samples * num_seeds))
    for start in range(0, num_studies, chunk):
        sl = slice(start, start + chunk)
        k = len(seed_means[sl])
        idx = rng.integers(0, num_seeds, size=(k, num_samples, num_seeds))
        rows = np.arange(k)[:, None, None]
        draws = seed_means[sl][rows, idx] + seed_se[sl][rows, idx] * rng.standard_normal(idx.shape)
        lo[sl], hi[sl] = np.percentile(draws.mean(axis=-1), [tail, 100 - tail], axis=-1)
    return lo, hi


def screen_tables(root: str, target: str, structure: str) -> list[np.ndarray]:
    """[S, n] target-Dice differences of every screened variant minus the baseline."""
    runs = [r for r in tables.collect(root, "fundus", targets=[target])]
    variants = sorted({r["variant"] for r in runs} - {BASELINE})
    by = {(r["variant"], r["seed"]): r for r in runs}
    out = []
    for v in variants:
        seeds = sorted(s for (w, s) in by if w == v and (BASELINE, s) in by)
        dice = [
            (stats.read_per_case(by[(v, s)]["workdir"], target),
             stats.read_per_case(by[(BASELINE, s)]["workdir"], target))
            for s in seeds
        ]  # fmt: skip
        cases = sorted(c for c in dice[0][0] if c[1] == structure)
        out.append(
            np.array([[a.get(c, math.nan) - b.get(c, math.nan) for c in cases] for a, b in dice])
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="docs/results/fundus_highlight_screen_h200")
    parser.add_argument("--studies", type=int, default=4000, help="simulated studies per cell")
    parser.add_argument("--out", default="benchmarks/interval_coverage.json")
    args = parser.parse_args()
    t0 = time.time()
    methods = dict(power.INTERVAL_METHODS, old_bootstrap=old_bootstrap)
    out = {"K": args.studies, "spreads": {}, "coverage": [], "power": {}}
    pools = {}
    for t in TARGETS:
        for s in STRUCTURES:
            pools[(t, s)] = power.pooled_spreads(screen_tables(args.root, t, s))
            out["spreads"][f"{t}/{s}"] = pools[(t, s)][0]
    for (t, s), (sp, case_pool, scale_pool) in pools.items():
        for scen in SCENARIOS:
            kw = dict(seed_sd=sp["seed_sd"], case_sd=sp["case_sd"], inter_sd=sp["inter_sd"])
            if scen != "gaussian":
                kw.update(case_pool=case_pool, inter_scale_pool=scale_pool)
            if scen == "case_heavy":
                kw["case_sd"] = sp["inter_sd"]
            for num_seeds in (2, 3, 5):
                for j, delta in enumerate((0.0, 0.02)):
                    seed = 1000 * num_seeds + 7 * j + 100 * SCENARIOS.index(scen)
                    res = power.coverage(
                        num_seeds, TARGETS[t], delta, num_studies=args.studies, seed=seed,
                        methods=methods, **kw,
                    )  # fmt: skip
                    spreads = {k: kw[k] for k in ("seed_sd", "case_sd", "inter_sd")}
                    out["coverage"].append(
                        dict(target=t, structure=s, n=TARGETS[t], scenario=scen, S=num_seeds,
                             delta=delta, spreads=spreads, result=res)
                    )  # fmt: skip
        print(f"[coverage] {t} {s} done, {time.time() - t0:.0f} s", flush=True)
    for s in STRUCTURES:
        sp, case_pool, scale_pool = pools[("Domain1", s)]
        res = {}
        for label, mult in (("measured", 1.0), ("seed_sd_x2", 2.0)):
            for scen in ("gaussian", "empirical"):
                kw = dict(seed_sd=sp["seed_sd"] * mult, case_sd=sp["case_sd"])
                kw.update(inter_sd=sp["inter_sd"], num_studies=args.studies)
                if scen == "empirical":
                    kw.update(case_pool=case_pool, inter_scale_pool=scale_pool)
                curve = {n: power.power(n, 51, 0.02, seed=n, **kw) for n in range(2, 11)}
                need = next((n for n, (p, _) in curve.items() if p >= 0.8), None)
                res[f"{label}/{scen}"] = dict(curve=curve, seeds_needed=need, seed_sd=kw["seed_sd"])
        out["power"][s] = res
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(markdown(out))
    print(f"[coverage] {time.time() - t0:.0f} s; numbers in {args.out}")


def markdown(d: dict) -> str:
    """The tables of docs/method.md from the numbers."""
    lines = []
    for scen in SCENARIOS:
        lines += [f"{scen}:", "", "| method | S | δ = 0 | δ = 0.02 |", "|---|---|---|---|"]
        for m, name in NAMES.items():
            for num_seeds in (2, 3, 5):
                cells = []
                for delta in (0.0, 0.02):
                    v = [
                        r["result"][m]["delta"]
                        for r in d["coverage"]
                        if (r["scenario"], r["S"], r["delta"]) == (scen, num_seeds, delta)
                    ]
                    cells.append(f"{min(v):.3f}-{max(v):.3f}")
                lines.append(f"| {name} | {num_seeds} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Power, δ = 0.02, Domain1 (51 cases): seeds per arm for 80%", ""]
    for s, res in d["power"].items():
        for key, r in res.items():
            curve = ", ".join(f"{n}: {p:.2f}" for n, (p, _) in r["curve"].items())
            lines.append(f"- {s} {key}: {r['seeds_needed']} ({curve})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
