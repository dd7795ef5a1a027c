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
