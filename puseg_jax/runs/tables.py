"""The results table of a suite: finished runs collected, aggregated over seeds, compared, and
the default variant chosen per target on source validation (`choice`)."""

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from puseg_jax.core.formatting import mean_std
from puseg_jax.model import losses
from puseg_jax.runs import stats
from puseg_jax.runs.choice import choose_per_target, source_val_rows, source_val_scores
from puseg_jax.runs.curves import DIAGNOSTIC_KEYS, highlight_diagnostics
from puseg_jax.runs.run_folder import RunFolder
from puseg_jax.runs.stats import _mean_std, paired_comparison, target_eval


def _cell(stat: tuple[float, float, int], digits: int) -> str:
    """A (mean, std, n) statistic as 'mean ± std' (`formatting.mean_std`)."""
    return mean_std(*stat[:2], digits, stat[2])


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
    for workdir in sorted(base.glob("*/*/seed*")):
        run = RunFolder(workdir)
        if not run.has_summary():  # not finished
            continue
        target, variant, seed = workdir.parent.parent.name, workdir.parent.name, workdir.name
        seed = int(seed[len("seed") :])
        summary = run.summary()
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


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (target, variant): mean, std and count over seeds of every reported number.

    Returns:
      Rows with 'target', 'method', 'variant', 'seeds', 'structures', 'distance_unit',
      'resolution' and 'stats' {metric name: (mean, std, n)}; metric names are
      '<structure>/<dice|hd95|asd>' (target), 'auroc_error', 'u_boundary_ratio',
      'source_val/<structure>/<dice|hd95>', 'source_val_dice', 'wall_s' and, for runs that
      logged them, 'diag/<key>' (`curves.highlight_diagnostics`: the last quarter of training);
      and 'per_run': each run's own values of the same names, with its 'seed'.
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
        per_run = []
        for r in group:
            run_values: dict[str, Any] = {}
            _, ev = target_eval(r["summary"])
            # How distances were measured (grid, geometry, unit); older runs name the unit only.
            units.add(ev.get("distance", ev.get("distance_unit")))
            resolutions.add(ev.get("resolution", "network"))
            for s in structures:
                for m in ("dice", "hd95", "asd"):
                    run_values[f"{s}/{m}"] = ev[s].get(m)
            unc = ev.get("uncertainty", {})
            run_values["auroc_error"] = unc.get("auroc_error")
            run_values["u_boundary_ratio"] = unc.get("u_boundary_ratio")
            val = source_val_scores(r["summary"])
            for s in structures:
                for m in ("dice", "hd95"):
                    run_values[f"source_val/{s}/{m}"] = val.get(f"{s}/{m}")
            run_values["source_val_dice"] = val.get("dice")
            run_values["wall_s"] = r["wall_s"]
            diag = highlight_diagnostics(r["workdir"]) or {}
            for k in DIAGNOSTIC_KEYS:
                run_values[f"diag/{k}"] = diag.get(k)
            for k, v in run_values.items():
                values.setdefault(k, []).append(v)
            per_run.append({"seed": r["seed"], **run_values})
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
                per_run=per_run,
            )
        )
    return rows


def _row_order(item) -> tuple:
    (target, variant), group = item
    order = {m: i for i, m in enumerate(losses.METHODS)}
    method = group[0]["method"]
    return (target, order.get(method, len(order)), variant)


def format_results(
    family: str,
    rows: list[dict[str, Any]],
    paired: list[dict[str, Any]],
    choices: Sequence[dict[str, Any]] | None = None,
    suite: str = "cpu",
    per_run: bool = False,
) -> str:
    """The markdown report: source-validation table, target table, mean over targets, paired
    comparisons, (when given) the choice of the default variant per target
    (`choice.choose_per_target`) and (with `per_run`) one row per run."""
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
        cells.append(mean_std(wall[0] / 60, wall[1] / 60, 1, wall[2]))
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

    lines += _format_diagnostics(rows)
    lines += ["", "## Paired comparisons, per-case target Dice", ""]
    if not paired:
        lines.append("No pair of compared variants has runs with a common seed on one target.")
    else:
        lines += [
            "A − B per case, runs paired by seed. 95% interval for the expected difference on a "
            "new case of the target for a new training seed: mean ± sqrt(t²(S−1)·V1 + "
            "t²(n−1)·V2), V1 = MS_seed/(S·n), V2 = max(MS_case − MS_err, 0)/(S·n) from the "
            "seed x case ANOVA (docs/method.md). 'better' or 'worse' only when it excludes zero; "
            f"with one seed the interval is over cases for that seed only: '{stats.ONE_SEED}'. "
            "Cases without a score in some seed are left out of every seed (counted in 'cases').",
            "",
            "| target | structure | A | B | cases | seeds | mean Δ Dice | per-seed Δ | 95% CI "
            "| verdict | A better (cases) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in paired:
            lo, hi = p["ci95"]
            ci = f"[{lo:+.4f}, {hi:+.4f}]" if math.isfinite(lo) else "n/a"
            per_seed = ", ".join(f"{x:+.4f}" for x in p["seed_diffs"])
            cases = str(p["num_cases"])
            if p["dropped_cases"]:
                cases += f" ({p['dropped_cases']} left out)"
            lines.append(
                f"| {p['target']} | {p['structure']} | {p['method']} | {p['baseline']} | "
                f"{cases} | {len(p['seeds'])} | {p['mean_diff']:+.4f} | {per_seed} | "
                f"{ci} | {p['verdict']} | {p['wins']}/{p['num_cases']} |"
            )
    for c in choices or ():
        lines += _format_choice(c)
    if per_run:
        lines += _format_per_run(rows)
    return "\n".join(lines) + "\n"


def _format_per_run(rows: list[dict[str, Any]]) -> list[str]:
    """The markdown of every run on its own (`aggregate`'s 'per_run'): the numbers that the seed
    means above average, and (for suites whose runs logged them) each run's highlighting
    diagnostics."""
    structures = rows[0]["structures"]
    runs = [(r, v) for r in rows for v in r["per_run"]]
    with_diag = any(r["stats"][f"diag/{DIAGNOSTIC_KEYS[0]}"][2] for r in rows)
    cols = [(f"source_val/{s}/dice", f"val {s} Dice", 4) for s in structures]
    cols += [(f"{s}/dice", f"{s} Dice", 4) for s in structures]
    cols += [(f"{s}/hd95", f"{s} HD95", 2) for s in structures]
    if with_diag:
        cols += [(f"diag/{k}", title, 3) for k, title in _DIAG_COLS[:3]]
    lines = [
        "",
        "## Per run",
        "",
        "Source validation pooled over the sources' cases (as above); the target's Dice and "
        "HD95, reported only"
        + ("; the highlighting diagnostics of the last quarter of training." if with_diag else "."),
        "",
        "| target | variant | seed | " + " | ".join(c[1] for c in cols) + " |",
        "|" + "---|" * (3 + len(cols)),
    ]
    for row, v in sorted(
        runs, key=lambda rv: (rv[0]["target"], rv[1]["seed"], *_variant_order(rv[0]))
    ):
        cells = [row["target"], row["variant"], str(v["seed"])]
        cells += [_cell(_mean_std([v.get(k)]), d) for k, _, d in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


_DIAG_COLS = (
    ("grad_share_top10u", "gradient share, top-10 % U"),
    ("grad_share_band", "gradient share, boundary band"),
    ("top10u_band_overlap", "top-10 % U in the band"),
    ("band_fraction", "band / all pixels"),
)


def _format_diagnostics(rows: list[dict[str, Any]]) -> list[str]:
    """The markdown of how strong the highlighting was, for the rows whose runs logged it."""
    rows = [r for r in rows if r["stats"].get(f"diag/{DIAGNOSTIC_KEYS[0]}", (0, 0, 0))[2]]
    if not rows:
        return []
    lines = [
        "",
        "## How strong was the highlighting (training batches, last quarter of training)",
        "",
        "Share of the loss gradient |dL/dlogits| on the 10 % most uncertain pixels of each "
        "image and on the pixels within the boundary band, the share of those uncertain pixels "
        "that lie in the band, and the band's share of all pixels (train/diagnostics.py); mean "
        "over the measurements of each run, then mean ± std over seeds.",
        "",
        "| target | variant | seeds | " + " | ".join(c for _, c in _DIAG_COLS) + " |",
        "|" + "---|" * (3 + len(_DIAG_COLS)),
    ]
    for r in rows:
        cells = [r["target"], r["variant"], str(r["stats"][f"diag/{DIAGNOSTIC_KEYS[0]}"][2])]
        cells += [_cell(r["stats"][f"diag/{k}"], 3) for k, _ in _DIAG_COLS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _format_choice(choice: dict[str, Any]) -> list[str]:
    """The markdown of one target's choice."""
    target = choice["target"]
    lines = [
        "",
        f"## Default chosen for {target} on source validation",
        "",
        f"Rule: {choice['rule']}. Source-validation evaluators read: "
        + ", ".join(f"{d} {sp} ({n} cases)" for d, sp, n in choice["source_val_evals"])
        + ".",
        "",
    ]
    if choice["chosen"] is None:
        return lines + [f"No variant of `ours` ran on {target}: nothing chosen."]
    lines += [
        "| variant | seeds | source-val Dice | source-val HD95 | tied with the best |",
        "|---|---|---|---|---|",
    ]
    for c in choice["candidates"]:
        lines.append(
            f"| {c['variant']} | {len(c['seeds'])} | {c['source_val_dice']:.4f} | "
            f"{_cell((c['source_val_hd95'], 0.0, 1), 2)} | {'yes' if c['tied'] else ''} |"
        )
    return lines + ["", f"**Chosen for {target}: `{choice['chosen']}`.**"]


def _variant_order(row: dict) -> tuple:
    order = {m: i for i, m in enumerate(losses.METHODS)}
    return (order.get(row["method"], len(order)), row["variant"])


def write_results(
    root: str | Path,
    family: str,
    suite: str = "cpu",
    variants: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    compare: Sequence[tuple[str, str]] | None = None,
    choose: bool = False,
    per_run: bool = False,
) -> str:
    """Aggregates the finished runs of one suite; writes `<root>/<family>/<suite>/results.*`.

    Args:
      root, family, suite: which runs (`collect`).
      variants, targets, seeds: optional restrictions (`collect`).
      compare: (A, B) variant pairs to compare; default [('ours', 'erm')].
      choose: add the choice of the default variant for each target, from that target's runs
        and their source validation only (`choice.choose_per_target`).
      per_run: add one row per run (seed by seed, beside the means).

    Returns:
      The markdown report.
    """
    runs = collect(root, family, suite, variants, targets, seeds)
    rows = aggregate(runs)
    paired = [p for a, b in (compare or [("ours", "erm")]) for p in paired_comparison(runs, a, b)]
    choices = None
    if choose:
        choices = []
        for target in sorted({r["target"] for r in runs}):
            choices.append(choose_per_target(source_val_rows(runs, target), target))
    text = format_results(family, rows, paired, choices, suite, per_run)
    out = Path(root) / family / suite
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    record = {"suite": suite, "rows": rows, "paired": paired, "choice": choices}
    with open(out / "results.json", "w") as f:
        json.dump(record, f, indent=2)
    return text
