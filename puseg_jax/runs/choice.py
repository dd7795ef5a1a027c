"""The choice of the default `ours` variant, per target, on source validation alone.

Why per target: a run's source validation is its sources' test splits, so the runs of another
target T' validate on T's test images whenever T is a source of T' (the Domain1-target runs
validate on 83 of Domain3's 89 test images). A choice pooled over targets let T's test images
take part in T's choice. Here the choice for T reads only the runs whose target is T, and of
them only the source-validation evaluators, none of which may be T's own domain.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from puseg_jax.model import losses
from puseg_jax.runs.stats import _mean_std

# Variants whose source-validation Dice is within this of the best are tied; the tie goes to
# the lowest source-validation HD95. Fixed before any screen was run.
CHOICE_DICE_TIE = 0.002

# Methods among which `--choose` picks the default: `ours` with any variant fields, and its
# ablation without highlighting (a null result keeps what source validation prefers).
CHOICE_METHODS = ("ours", "ours_no_highlight")


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


def source_val_rows(runs: Sequence[Mapping[str, Any]], target: str) -> list[dict[str, Any]]:
    """The rows `choose_per_target` reads for `target`: its runs' source validation only.

    Built from the summaries already loaded by `tables.collect` (no file is opened, so no
    per_case.csv of any split is read); the target evaluator's numbers are never copied.

    Args:
      runs: `tables.collect` dicts ('target', 'method', 'variant', 'seed', 'summary').
      target: keep the runs of this target.

    Returns:
      One row per variant: 'target', 'method', 'variant', 'seeds', 'structures', 'stats'
      ({'source_val_dice', 'source_val/<s>/<dice|hd95>'}: (mean, std, n) over seeds) and
      'source_val_evals' (sorted (domain, split, num_cases) of every run's source evaluators).

    Raises:
      ValueError: a run of `target` has a source-validation evaluator on `target`'s domain.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        if r["target"] == target:
            groups.setdefault(r["variant"], []).append(r)
    rows = []
    for variant, group in sorted(groups.items()):
        structures = group[0]["summary"]["structures"]
        values: dict[str, list[float | None]] = {}
        evals_seen = set()
        for r in group:
            for name, e in r["summary"]["evals"].items():
                if e.get("role") != "source_val":
                    continue
                domain = e.get("domain", name)
                if domain == target:
                    raise ValueError(
                        f"{target}/{variant}/seed{r['seed']}: source-validation evaluator "
                        f"{name!r} is on the target domain {target}; refused for the choice"
                    )
                evals_seen.add((domain, e.get("split"), e.get("num_cases")))
            val = source_val_scores(r["summary"])
            for s in structures:
                for m in ("dice", "hd95"):
                    values.setdefault(f"source_val/{s}/{m}", []).append(val.get(f"{s}/{m}"))
            values.setdefault("source_val_dice", []).append(val.get("dice"))
        rows.append(
            dict(
                target=target,
                method=group[0]["method"],
                variant=variant,
                seeds=sorted(r["seed"] for r in group),
                structures=structures,
                stats={k: _mean_std(v) for k, v in values.items()},
                source_val_evals=sorted(evals_seen, key=str),
            )
        )
    return rows


def is_diagnostic(variant: str) -> bool:
    """Whether a variant uses a diagnostic uncertainty source (the boundary oracle reads the
    ground truth of its training batch): such a run is reported, never a candidate default."""
    return any(
        f"loss.uncertainty_source={source}" in variant for source in losses.DIAGNOSTIC_SOURCES
    )


def choose_per_target(
    rows: Sequence[Mapping[str, Any]],
    target: str,
    methods: Sequence[str] = CHOICE_METHODS,
    tie: float = CHOICE_DICE_TIE,
) -> dict[str, Any]:
    """The default `ours` variant for `target`, from that target's runs and their source
    validation only.

    Diagnostic variants (`is_diagnostic`: the boundary oracle) are never candidates.

    Rule (the one fixed before the screen, now within one target): the highest seed-mean
    source-validation Dice (pooled over the sources' cases, mean over structures); candidates
    within `tie` of the best are tied and the lowest source-validation HD95 (mean over
    structures) among them wins. Rows of other targets and any statistic not starting with
    'source_val' are not read.

    Args:
      rows: `source_val_rows` (or `tables.aggregate`) rows with 'target', 'method', 'variant',
        'seeds', 'structures' and 'stats'.
      target: the target to choose for.
      methods: the methods whose variants are candidates.
      tie: the Dice tie.

    Returns:
      {'target', 'chosen' (None without candidates), 'rule', 'candidates' [{'variant',
      'source_val_dice', 'source_val_hd95', 'tied', 'seeds'}] best first, 'used' [{'target',
      'variant', 'seeds', 'stats'}]: every statistic read, so a reader can check that no target
      column took part, 'source_val_evals': the (domain, split, num_cases) of the candidates'
      source-validation evaluators, when the rows carry them}.
    """
    cands, used, evals = [], [], set()
    for r in rows:
        if r["target"] != target or r["method"] not in methods or is_diagnostic(r["variant"]):
            continue
        evals.update(tuple(e) for e in r.get("source_val_evals", ()))
        keys = ["source_val_dice"] + [f"source_val/{s}/hd95" for s in r["structures"]]
        read = {k: tuple(r["stats"][k]) for k in keys if k in r["stats"]}
        used.append(dict(target=target, variant=r["variant"], seeds=list(r["seeds"]), stats=read))
        if "source_val_dice" not in read or not math.isfinite(read["source_val_dice"][0]):
            continue
        hd = [read[k][0] for k in keys[1:] if k in read and math.isfinite(read[k][0])]
        cands.append(
            dict(
                variant=r["variant"],
                source_val_dice=float(read["source_val_dice"][0]),
                source_val_hd95=float(np.mean(hd)) if hd else float("nan"),
                seeds=list(r["seeds"]),
            )
        )
    rule = (
        f"runs of target {target} only: highest mean source-validation Dice; within {tie} of "
        "the best, the lowest source-validation HD95"
    )
    # What the choice read, for the record (never the target's own domain: `source_val_rows`).
    out = dict(target=target, rule=rule, used=used, source_val_evals=sorted(evals, key=str))
    if not cands:
        return dict(out, chosen=None, candidates=[])
    best = max(c["source_val_dice"] for c in cands)
    for c in cands:
        c["tied"] = c["source_val_dice"] >= best - tie
    # A NaN HD95 sorts last among the tied.
    chosen = min(
        (c for c in cands if c["tied"]),
        key=lambda c: (
            c["source_val_hd95"] if math.isfinite(c["source_val_hd95"]) else math.inf,
            -c["source_val_dice"],
        ),
    )["variant"]
    cands.sort(key=lambda c: -c["source_val_dice"])
    return dict(out, chosen=chosen, candidates=cands)
