"""The results table of a suite: finished runs collected, aggregated over seeds, compared, and
the default variant chosen on source validation."""

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from puseg_jax.core.formatting import mean_std
from puseg_jax.model import losses
from puseg_jax.runs.run_folder import RunFolder
from puseg_jax.runs.stats import BOOTSTRAP_SAMPLES, _mean_std, paired_comparison, target_eval

# Variants whose source-validation Dice is within this of the best are tied; the tie goes to
# the lowest source-validation HD95 (`choose_default`). Fixed before any screen was run.
CHOICE_DICE_TIE = 0.002

# Methods among which `--choose` picks the default: `ours` with any variant fields, and its
# ablation without highlighting (a null result keeps what source validation prefers).
CHOICE_METHODS = ("ours", "ours_no_highlight")


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
