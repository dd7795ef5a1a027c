"""What a results table shows, in a few lines: the domain gap of each method, the methods'
difference on the target, and where the uncertainty is."""

import math
from collections.abc import Sequence

import numpy as np

from puseg_jax.core.formatting import number
from puseg_jax.evaluators import scoring

BASELINE = "erm"


def _dice(summary: dict, role: str) -> dict[str, float]:
    """Per structure, the mean over the run's evaluators of `role` of their mean Dice."""
    evs = [ev for ev in summary["evals"].values() if ev["role"] == role]
    out = {}
    for s in summary["structures"]:
        vals = [ev[s]["dice"] for ev in evs if ev[s].get("dice") is not None]
        out[s] = float(np.mean(vals)) if vals else float("nan")
    return out


def explain(summaries: Sequence[dict]) -> str:
    """Three lines on what a results table shows.

    Args:
      summaries: run summaries (`summary.json`) on the same data, e.g. erm and ours.

    Returns:
      The domain gap of each run (Dice on source validation -> on the target, per structure),
      each run's Dice difference from the baseline on the target (the 'erm' run, else the
      first), and the ratio of mean uncertainty near ground-truth boundaries to elsewhere on
      the target; a line is left out when the summaries lack what it needs.
    """
    if not summaries:
        return ""
    first = summaries[0]
    structures = first["structures"]
    targets = [n for n, ev in first["evals"].items() if ev["role"] == "target"]
    if not targets:
        return "No target domain was evaluated: the table shows source validation only."
    target = targets[0] if len(targets) == 1 else f"the targets ({', '.join(targets)})"
    lines = []

    gaps = []
    for sm in summaries:
        src, tgt = _dice(sm, scoring.SELECTION_ROLE), _dice(sm, "target")
        per = ", ".join(f"{s} {number(src[s])} -> {number(tgt[s])}" for s in structures)
        gaps.append(f"{sm['method']} {per}")
    if any(ev["role"] == scoring.SELECTION_ROLE for ev in first["evals"].values()):
        lines.append(f"Domain gap (Dice, source validation -> unseen {target}): " + "; ".join(gaps))

    methods = [sm["method"] for sm in summaries]
    base = summaries[methods.index(BASELINE)] if BASELINE in methods else first
    base_dice = _dice(base, "target")
    diffs = []
    for sm in summaries:
        if sm is base:
            continue
        d = _dice(sm, "target")
        per = ", ".join(f"{s} {number(d[s] - base_dice[s], '+.3f')}" for s in structures)
        diffs.append(f"{sm['method']} - {base['method']}: {per}")
    if diffs:
        lines.append(f"On {target}, Dice of " + "; ".join(diffs))

    ratios = []
    for sm in summaries:
        vals = [
            ev["uncertainty"].get("u_boundary_ratio")
            for ev in sm["evals"].values()
            if ev["role"] == "target" and ev.get("uncertainty")
        ]
        vals = [v for v in vals if v is not None and not math.isnan(v)]
        if vals:
            ratios.append(f"{sm['method']} {number(float(np.mean(vals)), '.1f')}x")
    if ratios:
        lines.append(
            f"Mean uncertainty near ground-truth boundaries vs elsewhere on {target}: "
            + ", ".join(ratios)
        )
    return "\n".join(lines)
