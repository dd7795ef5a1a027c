"""The leave-one-domain-out suite: every (target, variant, seed) run, then one results table.

  python -m puseg_jax.experiments FAMILY [METHOD ...] [--targets T ...] [--seeds 0 1 2]
      [--budget cpu|paper] [--nifti] [--root workdirs/experiments] [--manual-dir DIR]
      [--data-dir DIR] [--dry-run] [--config.FIELD=VALUE ...]
  python -m puseg_jax.experiments table FAMILY [--budget ...] [--nifti] [--compare A:B ...]
      [--choose] [METHOD/VARIANT ...] [--targets ...] [--seeds ...]

FAMILY is `fundus` (targets Domain1..4) or `prostate` (RUNMC, BMC, I2CVB, UCL, BIDMC, HK).
Each run trains on the other domains of the family and is evaluated on the held-out target
(`configs/<family>.py:<TARGET>[,cpu][,nifti]`), in its own workdir

  <root>/<family>/<suite>/<target>/<variant>/seed<k>

named by everything that distinguishes it: the suite is the budget and data layout (`cpu`,
`paper`, `cpu_nifti`, ...), the variant is the method followed by every `--config.*` override
that changes the computation (`ours__loss.lambda_max=3`; overrides listed in
`config_diff.INCIDENTAL_FIELDS`, such as data paths, do not count). So a `paper` suite never
reuses a `cpu` run, and a table never mixes suites or variants. A run whose `summary.json`
exists is skipped, so an interrupted suite resumes where it stopped (a run interrupted midway
resumes from its own checkpoint, which refuses a changed config). Each run is a separate
`python -m puseg_jax.main` process: a failure is recorded and the suite goes on. Each workdir
gets `run.json` (what the run is) and `wall_time.json`.

At the end (or with `table` alone) every finished run of the suite is aggregated into
`<root>/<family>/<suite>/results.md` (and `results.json`): per target and variant, mean +-
standard deviation over seeds of the target's Dice, HD95 and ASD per structure, the uncertainty
quality and the source-validation scores; then paired comparisons (`--compare A:B`, default
`ours:erm`): per-case Dice differences of A and B run with the same seed, with a two-level
(seeds, then cases) bootstrap 95% interval and the per-seed mean differences. A comparison says
"better" or "worse" only when its interval excludes zero. `--choose` adds the choice of the
default `ours` variant by source validation alone (`choose_default`).
"""

import argparse
import csv
import json
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from puseg_jax import config_diff, losses

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

FAMILIES: dict[str, dict[str, Any]] = {
    "fundus": {
        "targets": ("Domain1", "Domain2", "Domain3", "Domain4"),
        "manual_dir": SHARED_DATA / "fundus",
    },
    "prostate": {
        "targets": ("RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK"),
        "manual_dir": SHARED_DATA / "prostate_slices",
    },
}

BOOTSTRAP_SAMPLES = 10_000
# Variants whose source-validation Dice is within this of the best are tied; the tie goes to
# the lowest source-validation HD95 (`choose_default`). Fixed before any screen was run.
CHOICE_DICE_TIE = 0.002
# Methods among which `--choose` picks the default: `ours` with any variant fields, and its
# ablation without highlighting (a null result keeps what source validation prefers).
CHOICE_METHODS = ("ours", "ours_no_highlight")


# ---------------------------------------------------------------------------------------------
# Planning and running.


def config_arg(family: str, target: str, budget: str, nifti: bool = False) -> str:
    """The `configs/<family>.py:<arg>` argument of one run."""
    parts = [target] + (["cpu"] if budget == "cpu" else []) + (["nifti"] if nifti else [])
    return f"configs/{family}.py:{','.join(parts)}"


def suite_name(budget: str, nifti: bool = False) -> str:
    """The folder of one budget and data layout: 'cpu', 'paper', 'cpu_nifti', 'paper_nifti'."""
    return budget + ("_nifti" if nifti else "")


def _override_pairs(overrides: Sequence[str]) -> list[tuple[str, str]]:
    """['--config.a.b=1'] -> [('a.b', '1')]; anything else is an error."""
    pairs = []
    for o in overrides:
        if not o.startswith("--config.") or "=" not in o:
            raise ValueError(f"Override {o!r} is not of the form --config.FIELD=VALUE")
        key, value = o[len("--config.") :].split("=", 1)
        pairs.append((key, value))
    return pairs


def variant_name(method: str, overrides: Sequence[str] = ()) -> str:
    """The method, then each override that changes the computation, sorted, as key=value.

    'ours' with ['--config.loss.lambda_max=3', '--config.data.data_dir=/x'] ->
    'ours__loss.lambda_max=3' (the data dir is incidental). A `--config.method=` override is
    refused: the method is given apart.
    """
    parts = []
    for key, value in sorted(_override_pairs(overrides)):
        if key in ("method", "seed"):
            raise ValueError(f"--config.{key} is set by the runner; pass it as an argument")
        if not config_diff.is_incidental(key):
            parts.append(f"{key}={value}".replace("/", "_").replace(" ", ""))
    return "__".join([method] + parts)


def run_dir(
    root: str | Path, family: str, suite: str, target: str, variant: str, seed: int
) -> Path:
    """`<root>/<family>/<suite>/<target>/<variant>/seed<k>`."""
    return Path(root) / family / suite / target / variant / f"seed{seed}"


def plan_runs(
    family: str,
    methods: Sequence[str],
    targets: Sequence[str],
    seeds: Sequence[int],
    root: str | Path,
    budget: str = "cpu",
    nifti: bool = False,
    manual_dir: str = "",
    data_dir: str = "",
    overrides: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Every run of the suite, in order: target, then method, then seed.

    Args:
      family: 'fundus' or 'prostate'.
      methods: method names (losses.METHODS).
      targets: held-out domains.
      seeds: seeds (config.seed).
      root: the suite's root directory.
      budget: 'cpu' (the fixed CPU budget) or 'paper' (paper scale).
      nifti: prostate only: the SAML NIfTI release instead of the PNG slices.
      manual_dir: the downloaded release ('' leaves the config's).
      data_dir: the TFDS data dir ('' leaves the config's).
      overrides: extra `--config.FIELD=VALUE` arguments for every run; those that change the
        computation name the variant (`variant_name`).

    Returns:
      Dicts with 'family', 'suite', 'target', 'method', 'variant', 'overrides', 'seed',
      'workdir', 'command' (argv) and 'done' (its summary.json exists).
    """
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; expected one of {sorted(FAMILIES)}")
    if nifti and family != "prostate":
        raise ValueError("--nifti applies to the prostate family only")
    bad = [m for m in methods if m not in losses.METHODS]
    if bad:
        raise ValueError(f"Unknown method(s) {bad}; expected some of {losses.METHODS}")
    known = FAMILIES[family]["targets"]
    bad = [t for t in targets if t not in known]
    if bad:
        raise ValueError(f"Unknown target(s) {bad} for {family}; expected some of {known}")
    if budget not in ("cpu", "paper"):
        raise ValueError(f"Unknown budget {budget!r}; expected 'cpu' or 'paper'")
    suite = suite_name(budget, nifti)
    runs = []
    for target in targets:
        for method in methods:
            variant = variant_name(method, overrides)
            for seed in seeds:
                workdir = run_dir(root, family, suite, target, variant, seed)
                command = [
                    sys.executable,
                    "-m",
                    "puseg_jax.main",
                    f"--config={config_arg(family, target, budget, nifti)}",
                    f"--workdir={workdir}",
                    f"--config.method={method}",
                    f"--config.seed={seed}",
                ]
                if manual_dir:
                    command.append(f"--config.data.manual_dir={manual_dir}")
                if data_dir:
                    command.append(f"--config.data.data_dir={data_dir}")
                command.extend(overrides)
                runs.append(
                    dict(
                        family=family,
                        suite=suite,
                        target=target,
                        method=method,
                        variant=variant,
                        overrides=list(overrides),
                        seed=seed,
                        workdir=str(workdir),
                        command=command,
                        done=(workdir / "summary.json").is_file(),
                    )
                )
    return runs


RUN_KEYS = ("family", "suite", "target", "method", "variant", "overrides", "seed")


def execute_run(run: dict[str, Any]) -> dict[str, Any]:
    """Runs one training-and-evaluation process, its output going to `<workdir>/log.txt`.

    Writes `<workdir>/run.json` (what the run is: `RUN_KEYS` and the command) first.

    Returns:
      The record also written to `<workdir>/wall_time.json`: wall seconds, return code, command.
    """
    workdir = Path(run["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    identity = {k: run[k] for k in RUN_KEYS} | {"command": run["command"]}
    (workdir / "run.json").write_text(json.dumps(identity, indent=2))
    started = time.time()
    with open(workdir / "log.txt", "a") as log:
        log.write(f"\n$ {' '.join(run['command'])}\n")
        log.flush()
        rc = subprocess.call(run["command"], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    record = {
        "wall_s": round(time.time() - started, 1),
        "returncode": rc,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "command": run["command"],
    }
    with open(workdir / "wall_time.json", "w") as f:
        json.dump(record, f, indent=2)
    return record


def run_suite(runs: list[dict[str, Any]], dry_run: bool = False) -> list[dict[str, Any]]:
    """Runs every run not done yet, one after the other; returns the failed ones."""
    todo = [r for r in runs if not r["done"]]
    print(f"[experiments] {len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to run")
    failed = []
    for i, run in enumerate(todo, start=1):
        tag = f"{run['target']}/{run['variant']}/seed{run['seed']}"
        if dry_run:
            print(" ".join(run["command"]))
            continue
        print(f"[experiments] ({i}/{len(todo)}) {tag} -> {run['workdir']}", flush=True)
        record = execute_run(run)
        status = "ok" if record["returncode"] == 0 else f"FAILED (rc {record['returncode']})"
        print(f"[experiments] {tag}: {status} in {record['wall_s']:.0f} s", flush=True)
        if record["returncode"] != 0:
            failed.append(run)
    if dry_run:
        for run in runs:
            if run["done"]:
                print(f"# done: {run['workdir']}")
    return failed


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


def _fmt(mean: float, std: float, digits: int, n: int = 2) -> str:
    """'mean ± std', or the mean alone when it comes from one value (no spread to show)."""
    if not math.isfinite(mean):
        return "n/a"
    if n < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _cell(stat: tuple[float, float, int], digits: int) -> str:
    mean, std, n = stat
    return _fmt(mean, std, digits, n) if n else "n/a"


def collect(
    root: str | Path,
    family: str,
    suite: str = "cpu",
    variants: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Every finished run of one suite, `<root>/<family>/<suite>/<target>/<variant>/seed<k>`.

    Args:
      root: the experiments root.
      family: 'fundus' or 'prostate'.
      suite: `suite_name(budget, nifti)`; suites are never mixed.
      variants: keep these variants (or methods: a method name keeps all its variants).
      targets: keep these targets.
      seeds: keep these seeds.

    Returns:
      Dicts with 'target', 'method', 'variant', 'seed', 'workdir', 'summary' and 'wall_s' (None
      if no wall_time.json). The method is the summary's; the variant is the folder's.
    """
    base = Path(root) / family / suite
    found = []
    for path in sorted(base.glob("*/*/seed*/summary.json")):
        workdir = path.parent
        target, variant, seed = workdir.parent.parent.name, workdir.parent.name, workdir.name
        seed = int(seed[len("seed") :])
        summary = json.loads(path.read_text())
        method = summary["method"]
        if targets and target not in targets:
            continue
        if variants and variant not in variants and method not in variants:
            continue
        if seeds and seed not in seeds:
            continue
        wall = workdir / "wall_time.json"
        found.append(
            dict(
                target=target,
                method=method,
                variant=variant,
                seed=seed,
                workdir=str(workdir),
                summary=summary,
                wall_s=json.loads(wall.read_text())["wall_s"] if wall.is_file() else None,
            )
        )
    return found


def target_eval(summary: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The (name, results) of the summary's target evaluator (there is exactly one)."""
    found = [(n, e) for n, e in summary["evals"].items() if e.get("role") == "target"]
    if len(found) != 1:
        raise ValueError(f"expected one target evaluator, found {[n for n, _ in found]}")
    return found[0]


def source_val_scores(summary: dict[str, Any]) -> dict[str, float]:
    """Source-validation Dice and HD95 per structure, pooled over the sources' cases.

    Each source evaluator's per-structure mean weighs by its number of cases, so a domain of
    3 validation images counts as 3 cases, not as a third of the evidence.

    Returns:
      {'<structure>/dice', '<structure>/hd95' (when reported), 'dice' (mean over structures)};
      empty when the run has no source-validation evaluator.
    """
    evals = [e for e in summary["evals"].values() if e.get("role") == "source_val"]
    out: dict[str, float] = {}
    if not evals:
        return out
    for s in summary["structures"]:
        for m in ("dice", "hd95"):
            pairs = [(e[s].get(m), e.get("num_cases", 1)) for e in evals]
            pairs = [(v, n) for v, n in pairs if v is not None and math.isfinite(v)]
            if pairs:
                out[f"{s}/{m}"] = float(
                    np.average([v for v, _ in pairs], weights=[n for _, n in pairs])
                )
    dice = [out[f"{s}/dice"] for s in summary["structures"] if f"{s}/dice" in out]
    if dice:
        out["dice"] = float(np.mean(dice))
    return out


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (target, variant): mean, std and count over seeds of every reported number.

    Returns:
      Rows with 'target', 'method', 'variant', 'seeds', 'structures', 'distance_unit',
      'resolution' and 'stats' {metric name: (mean, std, n)}; metric names are
      '<structure>/<dice|hd95|asd>' (target), 'auroc_error', 'u_boundary_ratio',
      'source_val/<structure>/<dice|hd95>', 'source_val_dice' and 'wall_s'.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["target"], r["variant"]), []).append(r)
    rows = []
    for (target, variant), group in sorted(groups.items(), key=_row_order):
        structures = group[0]["summary"]["structures"]
        methods = {r["method"] for r in group}
        if len(methods) != 1:
            raise ValueError(f"{target}/{variant} holds runs of several methods {methods}")
        values: dict[str, list[float]] = {}
        units, resolutions = set(), set()
        for r in group:
            _, ev = target_eval(r["summary"])
            # How distances were measured (grid, geometry, unit); older runs name the unit only.
            units.add(ev.get("distance", ev.get("distance_unit")))
            resolutions.add(ev.get("resolution", "network"))
            for s in structures:
                for m in ("dice", "hd95", "asd"):
                    values.setdefault(f"{s}/{m}", []).append(ev[s].get(m))
            unc = ev.get("uncertainty", {})
            values.setdefault("auroc_error", []).append(unc.get("auroc_error"))
            values.setdefault("u_boundary_ratio", []).append(unc.get("u_boundary_ratio"))
            val = source_val_scores(r["summary"])
            for s in structures:
                for m in ("dice", "hd95"):
                    values.setdefault(f"source_val/{s}/{m}", []).append(val.get(f"{s}/{m}"))
            values.setdefault("source_val_dice", []).append(val.get("dice"))
            values.setdefault("wall_s", []).append(r["wall_s"])
        rows.append(
            dict(
                target=target,
                method=methods.pop(),
                variant=variant,
                seeds=sorted(r["seed"] for r in group),
                structures=structures,
                distance_unit="/".join(sorted(str(u) for u in units)),
                resolution="/".join(sorted(str(u) for u in resolutions)),
                stats={k: _mean_std(v) for k, v in values.items()},
            )
        )
    return rows


def _row_order(item) -> tuple:
    (target, variant), group = item
    order = {m: i for i, m in enumerate(losses.METHODS)}
    method = group[0]["method"]
    return (target, order.get(method, len(order)), variant)


def read_per_case(workdir: str | Path, eval_name: str) -> dict[tuple[str, str], float]:
    """{(case_id, structure): Dice} from `<workdir>/eval/<eval_name>/per_case.csv`."""
    path = Path(workdir) / "eval" / eval_name / "per_case.csv"
    with open(path, newline="") as f:
        return {(row["case_id"], row["structure"]): float(row["dice"]) for row in csv.DictReader(f)}


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


def choose_default(rows: list[dict[str, Any]], methods: Sequence[str] = CHOICE_METHODS) -> dict:
    """The default `ours` variant chosen on source validation alone (never a target column).

    Rule (fixed before the screen ran): every variant of `methods` present on every target is a
    candidate; its score is the mean over targets of the seed-mean source-validation Dice
    (pooled over the sources' cases, averaged over structures). Candidates within
    `CHOICE_DICE_TIE` of the best are tied, and among them the lowest mean source-validation
    HD95 (averaged over structures) wins.

    Returns:
      {'chosen', 'rule', 'candidates': [{'variant', 'source_val_dice', 'source_val_hd95',
      'tied'}] best first}; 'chosen' is None when there is no candidate.
    """
    targets = sorted({r["target"] for r in rows})
    by_variant: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] in methods:
            by_variant.setdefault(r["variant"], []).append(r)
    cands = []
    for variant, mine in by_variant.items():
        if sorted(r["target"] for r in mine) != targets:
            continue
        dice = float(np.mean([r["stats"]["source_val_dice"][0] for r in mine]))
        hd = [
            r["stats"][f"source_val/{s}/hd95"][0]
            for r in mine
            for s in r["structures"]
            if f"source_val/{s}/hd95" in r["stats"]
        ]
        hd95 = float(np.mean(hd)) if hd else float("nan")
        cands.append(dict(variant=variant, source_val_dice=dice, source_val_hd95=hd95))
    rule = (
        f"highest mean source-validation Dice over targets {targets}; within {CHOICE_DICE_TIE} "
        "of the best, the lowest source-validation HD95"
    )
    if not cands:
        return {"chosen": None, "rule": rule, "candidates": []}
    best = max(c["source_val_dice"] for c in cands)
    for c in cands:
        c["tied"] = c["source_val_dice"] >= best - CHOICE_DICE_TIE
    tied = [c for c in cands if c["tied"]]
    chosen = min(tied, key=lambda c: (c["source_val_hd95"], -c["source_val_dice"]))["variant"]
    cands.sort(key=lambda c: -c["source_val_dice"])
    return {"chosen": chosen, "rule": rule, "candidates": cands}


def format_results(
    family: str,
    rows: list[dict[str, Any]],
    paired: list[dict[str, Any]],
    choice: dict | None = None,
    suite: str = "cpu",
) -> str:
    """The markdown report: source-validation table, target table, mean over targets, paired
    comparisons, and (when given) the choice of the default variant."""
    if not rows:
        return f"# {family} ({suite}): no finished runs\n"
    structures = rows[0]["structures"]
    val_cols = [(f"source_val/{s}/dice", f"val {s} Dice", 4) for s in structures]
    val_cols += [(f"source_val/{s}/hd95", f"val {s} HD95", 2) for s in structures]
    metric_cols = [(f"{s}/dice", f"{s} Dice", 4) for s in structures]
    metric_cols += [(f"{s}/hd95", f"{s} HD95", 2) for s in structures]
    metric_cols += [(f"{s}/asd", f"{s} ASD", 2) for s in structures]
    metric_cols += [
        ("auroc_error", "AUROC(U, error)", 3),
        ("u_boundary_ratio", "U boundary/interior", 2),
    ]
    resolutions = sorted({r["resolution"] for r in rows})
    lines = [
        f"# {family}: leave-one-domain-out results (suite `{suite}`)",
        "",
        f"Scored at resolution: {', '.join(resolutions)} ('native': probabilities resampled to "
        "the released grid before thresholding and scoring; 'network': at the network's input "
        "size). Mean ± std over seeds (the value alone for one seed); how distances were "
        "measured is in each row's `distances` column; HD95/ASD of an empty prediction or "
        "ground truth is the image diagonal (see puseg_jax/metrics.py).",
        "",
        "## Source validation (the sources' held-out split; what choices are made on)",
        "",
        "Pooled over the source domains' validation cases.",
        "",
        "| target | variant | seeds | " + " | ".join(c[1] for c in val_cols) + " |",
        "|" + "---|" * (3 + len(val_cols)),
    ]
    for r in rows:
        cells = [r["target"], r["variant"], str(len(r["seeds"]))]
        cells += [_cell(r["stats"].get(k, (math.nan, 0, 0)), d) for k, _, d in val_cols]
        lines.append("| " + " | ".join(cells) + " |")
    head = ["target", "variant", "seeds"] + [c[1] for c in metric_cols]
    head += ["wall (min)", "distances"]
    lines += [
        "",
        "## Target domain (reported, never used for a choice)",
        "",
        "AUROC: the uncertainty map as a detector of misclassified pixels; boundary/interior: "
        "mean U within 2 px of the true boundary over mean U elsewhere.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [r["target"], r["variant"], str(len(r["seeds"]))]
        cells += [_cell(r["stats"][k], d) for k, _, d in metric_cols]
        wall = r["stats"]["wall_s"]
        cells.append(_fmt(wall[0] / 60, wall[1] / 60, 1, wall[2]) if wall[2] else "n/a")
        cells.append(r["distance_unit"])
        lines.append("| " + " | ".join(cells) + " |")

    # Mean over targets of the per-target means (each target weighs the same).
    variants = list(dict.fromkeys(r["variant"] for r in sorted(rows, key=_variant_order)))
    cols = val_cols[: len(structures)] + metric_cols
    lines += [
        "",
        "## Mean over targets",
        "",
        "| variant | targets | " + " | ".join(c[1] for c in cols) + " |",
        "|" + "---|" * (2 + len(cols)),
    ]
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        cells = [v, str(len(mine))]
        for k, _, d in cols:
            cells.append(_cell(_mean_std([r["stats"].get(k, (math.nan,))[0] for r in mine]), d))
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "## Paired comparisons, per-case target Dice", ""]
    if not paired:
        lines.append("No pair of compared variants has runs with a common seed on one target.")
    else:
        lines += [
            "A − B per case, runs paired by seed; 95% interval: two-level percentile bootstrap "
            f"(seeds, then cases within each seed; {BOOTSTRAP_SAMPLES} resamples). 'better' or "
            "'worse' only when the interval excludes zero.",
            "",
            "| target | structure | A | B | cases | seeds | mean Δ Dice | per-seed Δ | 95% CI "
            "| verdict | A better (cases) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in paired:
            lo, hi = p["ci95"]
            per_seed = ", ".join(f"{x:+.4f}" for x in p["seed_diffs"])
            lines.append(
                f"| {p['target']} | {p['structure']} | {p['method']} | {p['baseline']} | "
                f"{p['num_cases']} | {len(p['seeds'])} | {p['mean_diff']:+.4f} | {per_seed} | "
                f"[{lo:+.4f}, {hi:+.4f}] | {p['verdict']} | {p['wins']}/{p['num_cases']} |"
            )
    if choice is not None:
        lines += ["", "## Default chosen on source validation", "", f"Rule: {choice['rule']}.", ""]
        if choice["chosen"] is None:
            lines.append("No variant of `ours` ran on every target: nothing chosen.")
        else:
            lines += [
                "| variant | mean source-val Dice | mean source-val HD95 | tied with the best |",
                "|---|---|---|---|",
            ]
            for c in choice["candidates"]:
                lines.append(
                    f"| {c['variant']} | {c['source_val_dice']:.4f} | "
                    f"{_cell((c['source_val_hd95'], 0.0, 1), 2)} | {'yes' if c['tied'] else ''} |"
                )
            lines += ["", f"**Chosen: `{choice['chosen']}`.**"]
    return "\n".join(lines) + "\n"


def _variant_order(row: dict) -> tuple:
    order = {m: i for i, m in enumerate(losses.METHODS)}
    return (order.get(row["method"], len(order)), row["variant"])


def parse_compare(pairs: Sequence[str] | None) -> list[tuple[str, str]]:
    """['ours:erm'] -> [('ours', 'erm')]."""
    out = []
    for p in pairs or ():
        a, sep, b = p.partition(":")
        if not sep or not a or not b:
            raise ValueError(f"--compare takes A:B (variant names), got {p!r}")
        out.append((a, b))
    return out


def write_results(
    root: str | Path,
    family: str,
    suite: str = "cpu",
    variants: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    compare: Sequence[tuple[str, str]] | None = None,
    choose: bool = False,
) -> str:
    """Aggregates the finished runs of one suite; writes `<root>/<family>/<suite>/results.*`.

    Args:
      root, family, suite: which runs (`collect`).
      variants, targets, seeds: optional restrictions (`collect`).
      compare: (A, B) variant pairs to compare; default [('ours', 'erm')].
      choose: add the source-validation choice of the default variant (`choose_default`).

    Returns:
      The markdown report.
    """
    runs = collect(root, family, suite, variants, targets, seeds)
    rows = aggregate(runs)
    paired = [p for a, b in (compare or [("ours", "erm")]) for p in paired_comparison(runs, a, b)]
    choice = choose_default(rows) if choose else None
    text = format_results(family, rows, paired, choice, suite)
    out = Path(root) / family / suite
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    record = {"suite": suite, "rows": rows, "paired": paired, "choice": choice}
    with open(out / "results.json", "w") as f:
        json.dump(record, f, indent=2)
    return text


# ---------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(options, `--config.*` overrides forwarded to every run)."""
    parser = argparse.ArgumentParser(
        prog="python -m puseg_jax.experiments",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "words",
        nargs="+",
        metavar="[table] FAMILY [METHOD ...]",
        help="family (fundus | prostate) then methods (default: all); a leading 'table' only "
        "aggregates the finished runs (then the names may also be variants)",
    )
    parser.add_argument("--targets", nargs="+", default=None, help="held-out domains (all)")
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=None, help="seeds to run (0); table: all found"
    )
    parser.add_argument("--budget", choices=("cpu", "paper"), default="cpu")
    parser.add_argument("--nifti", action="store_true", help="prostate: the SAML NIfTI release")
    parser.add_argument("--root", default=str(REPO_ROOT / "workdirs" / "experiments"))
    parser.add_argument(
        "--manual-dir",
        default=None,
        help="the downloaded release (default: ../shared/data/<fundus|prostate_slices> when "
        "present)",
    )
    parser.add_argument("--data-dir", default="", help="TFDS data dir (default: the config's)")
    parser.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="A:B",
        help="variant pairs for the paired comparison (default ours:erm)",
    )
    parser.add_argument(
        "--choose", action="store_true", help="add the source-validation choice of the default"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--table", action="store_true", help="only aggregate")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    words = list(args.words)
    if words[0] == "table":
        args.table = True
        words = words[1:]
    if not words:
        parser.error("missing FAMILY")
    args.family, args.methods = words[0], words[1:] or None
    try:
        args.compare = parse_compare(args.compare)
    except ValueError as e:
        parser.error(str(e))
    return args, rest


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the suite (unless `table`), then writes and prints the results table."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.family not in FAMILIES:
        raise SystemExit(f"Unknown family {args.family!r}; expected one of {sorted(FAMILIES)}")
    suite = suite_name(args.budget, args.nifti)
    failed = []
    report = dict(compare=args.compare or None, choose=args.choose)
    if args.table:
        # Only what was asked for; by default every finished run of the suite.
        text = write_results(
            args.root, args.family, suite, args.methods, args.targets, args.seeds, **report
        )
    else:
        targets = args.targets or list(FAMILIES[args.family]["targets"])
        manual_dir = args.manual_dir
        if manual_dir is None and not args.nifti:
            default_dir = FAMILIES[args.family]["manual_dir"]
            manual_dir = str(default_dir) if default_dir.is_dir() else ""
        runs = plan_runs(
            args.family,
            args.methods or list(losses.METHODS),
            targets,
            args.seeds or [0],
            args.root,
            budget=args.budget,
            nifti=args.nifti,
            manual_dir=manual_dir or "",
            data_dir=args.data_dir,
            overrides=overrides,
        )
        failed = run_suite(runs, dry_run=args.dry_run)
        if args.dry_run:
            return 0
        # The report covers every finished run of the suite, this invocation's and earlier ones.
        text = write_results(args.root, args.family, suite, **report)
    print(text)
    print(f"[experiments] written to {Path(args.root) / args.family / suite / 'results.md'}")
    if failed:
        print(f"[experiments] {len(failed)} run(s) failed (see their log.txt):", file=sys.stderr)
        for run in failed:
            print(f"  {run['workdir']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
