"""The report files of an evaluator (summary.json, per_case.csv, predictions.npz), the run's
summary.json and the results table."""

import csv
import json
import math
import os
import zipfile
from typing import Any

import jax
import ml_collections
import numpy as np

from puseg_jax.core.datasets import DatasetInfo
from puseg_jax.core.logging_utils import MetricWriter
from puseg_jax.evaluators.case_panels import write_panels
from puseg_jax.evaluators.scoring import (
    SELECTION_ROLE,
    SLICE_COUNTS,
    SURFACE_METRICS,
    scoring_resolution,
)


def make_writer(workdir: str) -> MetricWriter:
    """The run's TensorBoard and metrics.jsonl writer."""
    return MetricWriter(workdir)


def json_ready(x: Any) -> Any:
    """A nested structure with NaN and infinities as None (strict JSON) and numpy scalars as
    Python numbers."""
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(json_ready(obj), f, indent=2, allow_nan=False)


def save_npz(path: str, **arrays: np.ndarray) -> None:
    """`np.savez_compressed` at zlib level 1: as small within a few percent on predictions, and
    about twice as fast (compression is most of the time of an evaluator's reports)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)


PER_CASE_COLUMNS = (
    "case_id",
    "structure",
    "dice",
    "hd95",
    "asd",
    "empty_pred",
    "empty_gt",
    "num_slices",
    "unit",
    "distance",
) + SLICE_COUNTS


def write_per_case(
    path: str, rows: list[dict], info: DatasetInfo, unit: str, distance: str = ""
) -> None:
    """per_case.csv: one line per case and structure (distances in `unit`, measured as
    `distance` says; the slice counts are blank unless distances are per slice)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PER_CASE_COLUMNS)
        for row in rows:
            for s in info.structures:
                r = row[s]
                w.writerow(
                    [
                        row["case_id"],
                        s,
                        r["dice"],
                        r["hd95"],
                        r["asd"],
                        r["empty_pred"],
                        r["empty_gt"],
                        row["num_slices"],
                        unit,
                        distance,
                    ]
                    + [r.get(key, "") for key in SLICE_COUNTS]
                )


def write_domain_reports(
    workdir: str,
    name: str,
    res: dict,
    rows: list[dict],
    pred: dict[str, np.ndarray],
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
    _write_json(os.path.join(out, "summary.json"), res)
    if rows is not None:
        write_per_case(
            os.path.join(out, "per_case.csv"), rows, info, res["distance_unit"], res["distance"]
        )
    if config.eval.save_predictions:
        label = {} if rows is None else {"label": pred["mask"].astype(np.uint8)}
        save_npz(
            os.path.join(out, "predictions.npz"),
            image=pred["image"].astype(np.float16),
            **label,
            probability=pred["probs"].astype(np.float16),
            uncertainty=pred["uncertainty"].astype(np.float16),
            case_id=pred["case_id"].astype(str),
            slice_index=pred["slice_index"],
            spacing=pred["spacing"],
            spacing_unit=pred["spacing_unit"].astype(str),
            # The arrays above are on the network grid; a case's native grid, to resample them
            # to (`to_native`) and redraw or rescore it against the released ground truth.
            native_shape=pred["native_shape"],
            native_spacing=pred["native_spacing"],
            resolution=np.asarray(res.get("resolution", scoring_resolution(config))),
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
    _write_json(os.path.join(workdir, "summary.json"), summary)
    print(format_table([summary]), flush=True)


def _cell(x: Any, digits: int) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


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
                cells += [_cell(r.get("dice"), 4), _cell(r.get("hd95"), 2)]
                cells += [_cell(r.get("asd"), 2), str(r.get("n_empty_pred", ""))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
