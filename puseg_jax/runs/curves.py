"""Learning curves on source validation: the pooled Dice of a run at each periodic evaluation.

The number is the one the per-target choice reads at the end of a run
(`choice.source_val_scores`: per structure, each source evaluator weighed by its number of
cases, then the mean over structures), computed at every evaluation step from metrics.jsonl.
It is what a budget is chosen on (docs/results.md, "How many steps"): never a target's number.
"""

import os
from typing import Any

from puseg_jax.runs.choice import source_val_scores
from puseg_jax.runs.run_folder import RunFolder, open_run


def source_val_curve(run: str | os.PathLike | RunFolder) -> list[tuple[int, dict[str, float]]]:
    """[(step, source_val_scores at that step)] for every evaluation step that scored all sources.

    The evaluators and their case counts come from the run's summary.json, the per-step values
    from its metrics.jsonl (`eval/<evaluator>/<structure>/<dice|hd95>`). Target evaluators are
    never read.
    """
    run = open_run(run)
    summary = run.summary()
    sources = {n: e for n, e in summary["evals"].items() if e.get("role") == "source_val"}
    per_step: dict[int, dict[str, Any]] = {}
    for record in run.metrics():
        for name in sources:
            for s in summary["structures"]:
                for m in ("dice", "hd95"):
                    key = f"eval/{name}/{s}/{m}"
                    if key in record:
                        step_evals = per_step.setdefault(int(record["step"]), {})
                        step_evals.setdefault(name, {}).setdefault(s, {})[m] = record[key]
    curve = []
    for step, evals in sorted(per_step.items()):
        if set(evals) != set(sources) or any(
            "dice" not in evals[n].get(s, {}) for n in sources for s in summary["structures"]
        ):
            continue
        pseudo = {
            "structures": summary["structures"],
            "evals": {
                n: {"role": "source_val", "num_cases": sources[n].get("num_cases", 1), **evals[n]}
                for n in sources
            },
        }
        curve.append((step, source_val_scores(pseudo)))
    return curve


# The diagnostics of `train.diagnostics` (`KEYS`), as metrics.jsonl names them. Spelled out here:
# runs/ reads records and does not import the trainer.
DIAGNOSTIC_KEYS = ("grad_share_top10u", "grad_share_band", "top10u_band_overlap", "band_fraction")


def diagnostics_curve(run: str | os.PathLike | RunFolder) -> list[tuple[int, dict[str, float]]]:
    """The highlighting diagnostics of a run over training: (step, {key: value}) for each step
    that measured them, in step order, keys from `DIAGNOSTIC_KEYS` without the 'train/' prefix.

    A step written twice (a run resumed from a checkpoint logs again the steps after it) counts
    once, with its last value. Empty for a run that logged no diagnostics
    (`loss.diagnostics_every_steps = 0`); FileNotFoundError without metrics.jsonl.
    """
    per_step: dict[int, dict[str, float]] = {}
    for record in open_run(run).metrics():
        if f"train/{DIAGNOSTIC_KEYS[0]}" in record:
            per_step[int(record["step"])] = {
                k: float(record[f"train/{k}"]) for k in DIAGNOSTIC_KEYS if f"train/{k}" in record
            }
    return sorted(per_step.items())


def highlight_diagnostics(
    run: str | os.PathLike | RunFolder, last_fraction: float = 0.25
) -> dict[str, float] | None:
    """How strong the highlighting was in a run: each `train/<key>` of `DIAGNOSTIC_KEYS`
    averaged over the measurements of the last `last_fraction` of training.

    The last part of training is the one the question of issue 20 is about (hard pixels may only
    matter once the easy ones are learned); with `last_fraction=1` it is the whole run. A step
    written twice counts once, with its last value (`diagnostics_curve`).

    Returns:
      {key: mean} and 'measurements' (how many steps were averaged), or None for a run that
      logged no diagnostics (`loss.diagnostics_every_steps = 0`) or has no metrics.jsonl.
    """
    if not 0.0 < last_fraction <= 1.0:
        raise ValueError(f"last_fraction must be in (0, 1], got {last_fraction}")
    try:
        curve = diagnostics_curve(run)
    except FileNotFoundError:
        return None
    if not curve:
        return None
    last = curve[-1][0]
    start = last * (1.0 - last_fraction)
    kept = [v for step, v in curve if step > start or step == last]
    out = {}
    for k in DIAGNOSTIC_KEYS:
        vals = [v[k] for v in kept if k in v]
        if vals:
            out[k] = sum(vals) / len(vals)
    out["measurements"] = len(kept)
    return out
