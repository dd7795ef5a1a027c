"""The reports of an evaluator (eval/<name>/: summary.json, per_case.csv, predictions.npz,
panels), the run's summary.json and the results table; the files' formats are in `records`."""

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from puseg_jax.core.datasets import DatasetInfo
from puseg_jax.core.formatting import number
from puseg_jax.core.logging_utils import MetricWriter
from puseg_jax.evaluators import records
from puseg_jax.evaluators.case_panels import write_panels
from puseg_jax.evaluators.records import SLICE_COUNTS, Predictions
from puseg_jax.evaluators.scoring import SELECTION_ROLE, SURFACE_METRICS, scoring_resolution


def write_domain_reports(
    workdir: str,
    name: str,
    res: dict,
    rows: list[dict],
    pred: Predictions,
    info: DatasetInfo,
    config: ml_collections.ConfigDict,
    step: int,
    writer: MetricWriter,
) -> None:
    """Writes eval/<name>/{summary.json, per_case.csv, predictions.npz, panel_*.png} and the
    panels and uncertainty histogram to TensorBoard.

    A domain without labels (`python -m puseg_jax.evaluate` on images without masks) has no
    rows: it gets no per_case.csv, no label in predictions.npz and panels without ground truth.

    Args:
      workdir: the run's workdir.
      name: the evaluator.
      res: its `evaluate_domains` result.
      rows: its `score_cases` rows; None for a domain without labels.
      pred: its `predict_split` output.
      info: the dataset family.
      config: the experiment config (eval.save_predictions, eval.num_panels).
      step: the step logged.
      writer: the TensorBoard writer.
    """
    out = os.path.join(workdir, "eval", name)
    os.makedirs(out, exist_ok=True)
    records.write_json(os.path.join(out, records.SUMMARY_FILE), res)
    if rows is not None:
        records.write_per_case(
            os.path.join(out, records.PER_CASE_FILE),
            rows,
            info.structures,
            res["distance_unit"],
            res["distance"],
        )
    if config.eval.save_predictions:
        # The arrays are on the network grid; `native_shape` and `native_spacing` give each
        # example's native grid, to resample them to (`to_native`) and redraw or rescore it
        # against the released ground truth.
        resolution = str(res.get("resolution", scoring_resolution(config)))
        pred.replace(resolution=resolution).save(
            os.path.join(out, records.PREDICTIONS_FILE), with_label=rows is not None
        )
    write_panels(writer, step, name, res["role"], pred, rows, info, config, png_dir=out)


# ---------------------------------------------------------------------------------------------
# Model selection and the run's summary.


def mean_dice(results: dict[str, dict]) -> float:
    """Mean Dice over evaluators and structures, the model-selection score.

    Args:
      results: `evaluate_domains` output of source-validation evaluators only.

    Returns:
      The mean of the per-structure mean Dice.

    Raises:
      ValueError: if any result is not a source-validation one: a target domain must never
        choose the checkpoint.
    """
    others = sorted(n for n, r in results.items() if r["role"] != SELECTION_ROLE)
    if others:
        raise ValueError(
            f"Model selection may use '{SELECTION_ROLE}' evaluators only, not {others}"
        )
    if not results:
        raise ValueError("No source-validation results to select a checkpoint with")
    vals = [r["structures"][s]["dice"]["mean"] for r in results.values() for s in r["structures"]]
    return float(np.mean(vals))


def make_summary(config, info, results, evals, selected, step) -> dict[str, Any]:
    """The run's summary.json: per evaluator and structure the means of Dice, HD95 and ASD and
    the case counts (the full statistics are in eval/<name>/summary.json)."""
    del evals
    out_evals = {}
    for n, r in results.items():
        ev: dict[str, Any] = {
            "role": r["role"],
            "domain": r["domain"],
            "split": r["split"],
            "num_examples": r["num_examples"],
            "num_cases": r["num_cases"],
            "resolution": r["resolution"],
            "distance_unit": r["distance_unit"],
            "distance": r["distance"],
        }
        for s, sm in r["structures"].items():
            ev[s] = {m: sm[m]["mean"] for m in SURFACE_METRICS if m in sm}
            ev[s] |= {"dice_std": sm["dice"]["std"], "n": sm["n"]}
            ev[s] |= {"n_empty_pred": sm["n_empty_pred"], "n_empty_gt": sm["n_empty_gt"]}
            ev[s] |= {f"n_{k}": sm[f"n_{k}"] for k in SLICE_COUNTS if f"n_{k}" in sm}
        if "uncertainty" in r:
            ev["uncertainty_resolution"] = r["uncertainty_resolution"]
            ev["uncertainty"] = {k: v for k, v in r["uncertainty"].items() if k != "reliability"}
        out_evals[n] = ev
    return {
        "method": config.method,
        "dataset": config.data.name,
        "source_domains": list(config.data.source_domains),
        "target_domains": list(config.data.target_domains),
        "seed": config.seed,
        "checkpoint": selected,
        "step": int(step),
        "structures": list(info.structures),
        "evals": out_evals,
    }


def write_summary(workdir: str, summary: dict) -> None:
    """Writes <workdir>/summary.json (process 0) and prints the results table."""
    if jax.process_index() != 0:
        return
    records.write_json(os.path.join(workdir, records.SUMMARY_FILE), summary)
    print(format_table([summary]), flush=True)


def format_table(summaries: list[dict]) -> str:
    """Markdown table of run summaries: one row per (method, evaluator), per structure the mean
    Dice, HD95 and ASD (measured as the evaluator's 'distance' says: geometry, grid, unit) and
    the cases with an empty prediction.

    Args:
      summaries: `make_summary` outputs (e.g. erm and ours on the same data).

    Returns:
      The table, target evaluators after the source-validation ones of each run.
    """
    if not summaries:
        return ""
    structures = summaries[0]["structures"]
    head = ["method", "domain", "role", "distances", "cases"]
    for s in structures:
        head += [f"{s} Dice", f"{s} HD95", f"{s} ASD", f"{s} empty pred"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sm in summaries:
        evs = sorted(sm["evals"].items(), key=lambda kv: kv[1]["role"] == "target")
        for name, ev in evs:
            cells = [
                sm["method"],
                name,
                ev["role"],
                ev.get("distance", ev.get("distance_unit", "")),
                str(ev.get("num_cases", "")),
            ]
            for s in structures:
                r = ev[s]
                cells += [number(r.get("dice"), ".4f"), number(r.get("hd95"), ".2f")]
                cells += [number(r.get("asd"), ".2f"), str(r.get("n_empty_pred", ""))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
