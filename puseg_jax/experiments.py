"""The leave-one-domain-out suite: every (target, method, seed) run, then one results table.

  python -m puseg_jax.experiments FAMILY [METHOD ...] [--targets T ...] [--seeds 0 1 2]
      [--budget cpu|paper] [--nifti] [--root workdirs/experiments] [--manual-dir DIR]
      [--data-dir DIR] [--dry-run] [--config.FIELD=VALUE ...]
  python -m puseg_jax.experiments table FAMILY [METHOD ...] [--targets ...] [--seeds ...]

FAMILY is `fundus` (targets Domain1..4) or `prostate` (RUNMC, BMC, I2CVB, UCL, BIDMC, HK).
Each run trains on the other domains of the family and is evaluated on the held-out target
(`configs/<family>.py:<TARGET>[,cpu]`), in its own workdir
`<root>/<family>/<target>/<method>/seed<k>`. A run whose `summary.json` exists is skipped, so an
interrupted suite resumes where it stopped (a run interrupted midway resumes from its own
checkpoint). Each run is a separate `python -m puseg_jax.main` process: a failure is recorded
and the suite goes on, and every run starts with fresh JAX state. The wall time of each run is
written to `<workdir>/wall_time.json`.

At the end (or with `table` alone) every summary found is aggregated into
`<root>/<family>/results.md` (and `results.json`): per target and method, mean +- standard
deviation over seeds of the target's Dice, HD95 and ASD per structure, the AUROC of the
uncertainty for detecting misclassified pixels and the boundary/interior uncertainty ratio; then
a paired comparison of `ours` against `erm`: per-case Dice differences (same target, same seed,
same case) with a bootstrap 95% interval of their mean over cases.
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

from puseg_jax import losses

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


# ---------------------------------------------------------------------------------------------
# Planning and running.


def config_arg(family: str, target: str, budget: str, nifti: bool = False) -> str:
    """The `configs/<family>.py:<arg>` argument of one run."""
    parts = [target] + (["cpu"] if budget == "cpu" else []) + (["nifti"] if nifti else [])
    return f"configs/{family}.py:{','.join(parts)}"


def run_dir(root: str | Path, family: str, target: str, method: str, seed: int) -> Path:
    """`<root>/<family>/<target>/<method>/seed<k>`."""
    return Path(root) / family / target / method / f"seed{seed}"


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
      overrides: extra `--config.FIELD=VALUE` arguments for every run.

    Returns:
      Dicts with 'target', 'method', 'seed', 'workdir', 'command' (argv) and 'done' (its
      summary.json exists).
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
    runs = []
    for target in targets:
        for method in methods:
            for seed in seeds:
                workdir = run_dir(root, family, target, method, seed)
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
                        target=target,
                        method=method,
                        seed=seed,
                        workdir=str(workdir),
                        command=command,
                        done=(workdir / "summary.json").is_file(),
                    )
                )
    return runs


def execute_run(run: dict[str, Any]) -> dict[str, Any]:
    """Runs one training-and-evaluation process, its output going to `<workdir>/log.txt`.

    Returns:
      The record also written to `<workdir>/wall_time.json`: wall seconds, return code, command.
    """
    workdir = Path(run["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
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
        tag = f"{run['target']}/{run['method']}/seed{run['seed']}"
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


def target_eval(summary: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The (name, results) of the summary's target evaluator (there is exactly one)."""
    found = [(n, e) for n, e in summary["evals"].items() if e.get("role") == "target"]
    if len(found) != 1:
        raise ValueError(f"expected one target evaluator, found {[n for n, _ in found]}")
    return found[0]


def collect(
    root: str | Path,
    family: str,
    methods: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Every finished run under `<root>/<family>` (optionally restricted).

    Returns:
      Dicts with 'target', 'method', 'seed', 'workdir', 'summary' and 'wall_s' (None if no
      wall_time.json).
    """
    base = Path(root) / family
    found = []
    for path in sorted(base.glob("*/*/seed*/summary.json")):
        workdir = path.parent
        target, method, seed = workdir.parent.parent.name, workdir.parent.name, workdir.name
        seed = int(seed[len("seed") :])
        if targets and target not in targets:
            continue
        if methods and method not in methods:
            continue
        if seeds and seed not in seeds:
            continue
        wall = workdir / "wall_time.json"
        found.append(
            dict(
                target=target,
                method=method,
                seed=seed,
                workdir=str(workdir),
                summary=json.loads(path.read_text()),
                wall_s=json.loads(wall.read_text())["wall_s"] if wall.is_file() else None,
            )
        )
    return found


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (target, method): mean, std and count over seeds of every reported number.

    Returns:
      Rows with 'target', 'method', 'seeds', 'structures', 'distance_unit' and 'stats'
      {metric name: (mean, std, n)}; metric names are '<structure>/<dice|hd95|asd>',
      'auroc_error', 'u_boundary_ratio', 'source_val_dice' and 'wall_s'.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["target"], r["method"]), []).append(r)
    rows = []
    for (target, method), group in sorted(groups.items(), key=_row_order):
        structures = group[0]["summary"]["structures"]
        values: dict[str, list[float]] = {}
        units = set()
        for r in group:
            _, ev = target_eval(r["summary"])
            # How distances were measured (grid, geometry, unit); older runs name the unit only.
            units.add(ev.get("distance", ev.get("distance_unit")))
            for s in structures:
                for m in ("dice", "hd95", "asd"):
                    values.setdefault(f"{s}/{m}", []).append(ev[s].get(m))
            unc = ev.get("uncertainty", {})
            values.setdefault("auroc_error", []).append(unc.get("auroc_error"))
            values.setdefault("u_boundary_ratio", []).append(unc.get("u_boundary_ratio"))
            val = [
                e[s]["dice"]
                for e in r["summary"]["evals"].values()
                if e.get("role") == "source_val"
                for s in structures
            ]
            values.setdefault("source_val_dice", []).append(float(np.mean(val)) if val else None)
            values.setdefault("wall_s", []).append(r["wall_s"])
        rows.append(
            dict(
                target=target,
                method=method,
                seeds=sorted(r["seed"] for r in group),
                structures=structures,
                distance_unit="/".join(sorted(str(u) for u in units)),
                stats={k: _mean_std(v) for k, v in values.items()},
            )
        )
    return rows


def _row_order(item) -> tuple:
    (target, method), _ = item
    order = {m: i for i, m in enumerate(losses.METHODS)}
    return (target, order.get(method, len(order)), method)


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


def paired_comparison(
    runs: list[dict[str, Any]], method: str = "ours", baseline: str = "erm"
) -> list[dict[str, Any]]:
    """Per target and structure: per-case Dice of `method` minus `baseline`.

    Runs are paired by seed (same data order and initialisation); a case's difference is
    averaged over the seeds both methods have, and the interval is a bootstrap over cases.

    Returns:
      Rows with 'target', 'structure', 'num_cases', 'seeds', 'mean_diff', 'ci95' (lo, hi) and
      'wins' (cases where `method` is better).
    """
    by_key = {(r["target"], r["method"], r["seed"]): r for r in runs}
    out = []
    for target in sorted({r["target"] for r in runs}):
        seeds = sorted(
            s for (t, m, s) in by_key if t == target and m == method and (t, baseline, s) in by_key
        )
        if not seeds:
            continue
        diffs: dict[tuple[str, str], list[float]] = {}
        for seed in seeds:
            a, b = by_key[(target, method, seed)], by_key[(target, baseline, seed)]
            name_a, _ = target_eval(a["summary"])
            name_b, _ = target_eval(b["summary"])
            dice_a = read_per_case(a["workdir"], name_a)
            dice_b = read_per_case(b["workdir"], name_b)
            if set(dice_a) != set(dice_b):
                raise ValueError(
                    f"{a['workdir']} and {b['workdir']} report different cases; cannot pair them"
                )
            for key in dice_a:
                diffs.setdefault(key, []).append(dice_a[key] - dice_b[key])
        structures = a["summary"]["structures"]
        for s in structures:
            d = np.array([np.mean(v) for (case, st), v in sorted(diffs.items()) if st == s])
            lo, hi = bootstrap_interval(d)
            out.append(
                dict(
                    target=target,
                    structure=s,
                    num_cases=int(d.size),
                    seeds=seeds,
                    mean_diff=float(d.mean()) if d.size else float("nan"),
                    ci95=(lo, hi),
                    wins=int(np.sum(d > 0)),
                )
            )
    return out


def format_results(family: str, rows: list[dict[str, Any]], paired: list[dict[str, Any]]) -> str:
    """The markdown report: one table of all (target, method) rows, the mean over targets of
    each method, and the paired ours-vs-erm comparison."""
    if not rows:
        return f"# {family}: no finished runs\n"
    structures = rows[0]["structures"]
    metric_cols = [(f"{s}/dice", f"{s} Dice", 4) for s in structures]
    metric_cols += [(f"{s}/hd95", f"{s} HD95", 2) for s in structures]
    metric_cols += [(f"{s}/asd", f"{s} ASD", 2) for s in structures]
    metric_cols += [
        ("auroc_error", "AUROC(U, error)", 3),
        ("u_boundary_ratio", "U boundary/interior", 2),
        ("source_val_dice", "source-val Dice", 4),
    ]
    head = ["target", "method", "seeds"] + [c[1] for c in metric_cols] + ["wall (min)"]
    lines = [
        f"# {family}: leave-one-domain-out results",
        "",
        "Target-domain metrics, mean ± std over seeds (the value alone for one seed; "
        "distances in the unit of each row's "
        "`unit`; HD95/ASD of an empty prediction or ground truth is the image diagonal, see "
        "puseg_jax/metrics.py). AUROC: the uncertainty map as a detector of misclassified "
        "pixels; boundary/interior: mean U within 2 px of the true boundary over mean U "
        "elsewhere.",
        "",
        "| " + " | ".join(head) + " | unit |",
        "|" + "---|" * (len(head) + 1),
    ]
    for r in rows:
        cells = [r["target"], r["method"], str(len(r["seeds"]))]
        cells += [_cell(r["stats"][k], d) for k, _, d in metric_cols]
        wall = r["stats"]["wall_s"]
        cells.append(_fmt(wall[0] / 60, wall[1] / 60, 1, wall[2]) if wall[2] else "n/a")
        lines.append("| " + " | ".join(cells) + f" | {r['distance_unit']} |")

    # Mean over targets of the per-target means (each target weighs the same).
    methods = [m for m in losses.METHODS if any(r["method"] == m for r in rows)]
    methods += sorted({r["method"] for r in rows} - set(methods))
    lines += [
        "",
        "## Mean over targets",
        "",
        "| method | targets | " + " | ".join(c[1] for c in metric_cols) + " |",
        "|" + "---|" * (2 + len(metric_cols)),
    ]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        cells = [m, str(len(mine))]
        for k, _, d in metric_cols:
            cells.append(_cell(_mean_std([r["stats"][k][0] for r in mine]), d))
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "## Paired comparison: ours − erm, per-case target Dice", ""]
    if not paired:
        lines.append("No target has both `ours` and `erm` runs with a common seed.")
    else:
        lines += [
            "Per case, the Dice difference of the two methods' runs with the same seed, "
            f"averaged over seeds; 95% interval: percentile bootstrap over cases "
            f"({BOOTSTRAP_SAMPLES} resamples).",
            "",
            "| target | structure | cases | seeds | mean Δ Dice | 95% CI | ours better |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in paired:
            lo, hi = p["ci95"]
            lines.append(
                f"| {p['target']} | {p['structure']} | {p['num_cases']} | {len(p['seeds'])} | "
                f"{p['mean_diff']:+.4f} | [{lo:+.4f}, {hi:+.4f}] | "
                f"{p['wins']}/{p['num_cases']} |"
            )
    return "\n".join(lines) + "\n"


def write_results(
    root: str | Path,
    family: str,
    methods: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> str:
    """Aggregates the finished runs; writes `<root>/<family>/results.{md,json}`.

    Returns:
      The markdown report.
    """
    runs = collect(root, family, methods, targets, seeds)
    rows = aggregate(runs)
    paired = paired_comparison(runs)
    text = format_results(family, rows, paired)
    out = Path(root) / family
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    with open(out / "results.json", "w") as f:
        json.dump({"rows": rows, "paired_ours_vs_erm": paired}, f, indent=2)
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
        "aggregates the finished runs",
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
    return args, rest


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the suite (unless `table`), then writes and prints the results table."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.family not in FAMILIES:
        raise SystemExit(f"Unknown family {args.family!r}; expected one of {sorted(FAMILIES)}")
    failed = []
    if args.table:
        # Only what was asked for; by default every finished run of the family.
        text = write_results(args.root, args.family, args.methods, args.targets, args.seeds)
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
        # The report covers every finished run of the family, this suite's and earlier ones.
        text = write_results(args.root, args.family)
    print(text)
    print(f"[experiments] written to {Path(args.root) / args.family / 'results.md'}")
    if failed:
        print(f"[experiments] {len(failed)} run(s) failed (see their log.txt):", file=sys.stderr)
        for run in failed:
            print(f"  {run['workdir']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
