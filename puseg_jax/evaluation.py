"""Evaluation of named evaluators: predict every example, score cases on the host, write reports.

Nothing here looks at the labels to decide what to predict: every example of the split is
predicted (the last batch is padded and the padding dropped afterwards), at the network's input
size, with BatchNorm's running statistics. Volumes are re-stacked from their slices by
(case_id, slice_index) and scored in 3-D with the voxel spacing.
"""

import csv
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from puseg_jax import input_pipeline, metrics, parallel, visualize
from puseg_jax.datasets import DatasetInfo
from puseg_jax.logging_utils import MetricWriter

SURFACE_METRICS = ("dice", "hd95", "asd")


def make_writer(workdir: str) -> MetricWriter:
    return MetricWriter(workdir)


def predict_split(
    p_eval_step,
    state,
    rng,
    config,
    info: DatasetInfo,
    data_dir: str,
    mesh,
    strategy: str,
    domain: str,
    split: str,
) -> dict[str, np.ndarray]:
    """Predictions for every example of (domain, split), in the source's order, no padding."""
    out: dict[str, list] = {
        k: []
        for k in (
            "image",
            "mask",
            "spacing",
            "probs",
            "uncertainty",
            "case_id",
            "slice_index",
            "spacing_unit",
        )
    }
    batches = input_pipeline.eval_batches(
        info, config, domain, split, data_dir, config.eval.batch_size
    )
    for i, batch in enumerate(batches):
        n = len(batch["case_id"])
        device_batch = parallel.shard_batch({"image": batch["image"]}, mesh, strategy)
        pred = parallel.to_host(p_eval_step(state, device_batch, jax.random.fold_in(rng, i)))
        for k in ("image", "mask", "spacing", "case_id", "slice_index", "spacing_unit"):
            out[k].append(batch[k][:n])
        out["probs"].append(pred["probs"][:n])
        out["uncertainty"].append(pred["uncertainty"][:n])
    return {k: np.concatenate(v) for k, v in out.items()}


def structure_masks(probs: np.ndarray, info: DatasetInfo, config) -> np.ndarray:
    """Probabilities of one case [(D,) H, W, K] -> post-processed masks [S, (D,) H, W]."""
    ec = config.eval
    if info.label_mode == "sigmoid":
        if len(info.structures) == 2:
            od, oc = metrics.postprocess_fundus(
                probs[..., 0], probs[..., 1], ec.threshold, ec.largest_component
            )
            return np.stack([od, oc])
        masks = [probs[..., k] > ec.threshold for k in range(len(info.structures))]
    else:
        label = np.argmax(probs, axis=-1)
        masks = [label == k + 1 for k in range(len(info.structures))]
    if ec.largest_component:
        masks = [metrics.largest_connected_component(m) for m in masks]
    return np.stack(masks)


def gt_structures(mask: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """Class mask -> [S, ...] ground-truth structure masks (nested for sigmoid)."""
    if info.label_mode == "sigmoid":
        return np.stack([mask > k for k in range(len(info.structures))])
    return np.stack([mask == k + 1 for k in range(len(info.structures))])


def group_cases(pred: dict[str, np.ndarray], volumetric: bool) -> list[tuple[str, np.ndarray]]:
    """(case_id, example indices in slice order); one example per case when 2-D."""
    if not volumetric:
        return [(str(c), np.array([i])) for i, c in enumerate(pred["case_id"])]
    cases: dict[str, list] = {}
    for i, (c, s) in enumerate(zip(pred["case_id"], pred["slice_index"], strict=False)):
        cases.setdefault(str(c), []).append((int(s), i))
    out = []
    for c, items in cases.items():
        items.sort()
        slices = [s for s, _ in items]
        if slices != list(range(len(slices))):
            raise ValueError(f"Case {c}: slices {slices} are not 0..n-1; cannot re-stack")
        out.append((c, np.array([i for _, i in items])))
    return out


def score_cases(pred: dict[str, np.ndarray], info: DatasetInfo, config, full: bool):
    """Per-case rows {case_id, <structure>: {dice, hd95, asd, empty_pred, empty_gt}}."""
    rows = []
    for case_id, idx in group_cases(pred, info.volumetric):
        probs = pred["probs"][idx]
        gt = gt_structures(pred["mask"][idx], info)
        if info.volumetric:
            pm = structure_masks(probs, info, config)  # [S, D, H, W]
            spacing = pred["spacing"][idx[0]][[2, 0, 1]]  # (slice, row, col) for (D, H, W)
        else:
            pm = structure_masks(probs[0], info, config)
            gt = gt[:, 0]
            spacing = pred["spacing"][idx[0]][:2]
        row: dict[str, Any] = {"case_id": case_id}
        for s, name in enumerate(info.structures):
            if full:
                row[name] = metrics.compute_case_metrics(pm[s], gt[s], spacing)
            else:
                row[name] = {
                    "dice": metrics.compute_dice(pm[s], gt[s]),
                    "empty_pred": not pm[s].any(),
                    "empty_gt": not gt[s].any(),
                }
        rows.append(row)
    return rows


def uncertainty_quality(pred: dict[str, np.ndarray], info: DatasetInfo, width: int) -> dict:
    """Pixel-level calibration and uncertainty-error agreement over the whole split."""
    probs, mask, unc = pred["probs"], pred["mask"], pred["uncertainty"]
    if info.label_mode == "sigmoid":
        target = gt_structures(mask, info).transpose(1, 2, 3, 0)  # [N, H, W, K]
        conf = np.maximum(probs, 1 - probs)
        correct = (probs > 0.5) == target
        error = np.any(~correct, axis=-1)
        brier, nll = metrics.brier_score(probs, target), metrics.nll(probs, target)
    else:
        conf = probs.max(axis=-1)
        correct = probs.argmax(axis=-1) == mask
        error = ~correct
        brier, nll = metrics.brier_score(probs, mask), metrics.nll(probs, mask)
    cal = metrics.calibration(conf, correct)
    band = np.zeros(mask.shape, bool)
    for s in gt_structures(mask, info):
        band |= metrics.boundary_band(s, width)
    u_band = float(unc[band].mean()) if band.any() else float("nan")
    u_rest = float(unc[~band].mean()) if (~band).any() else float("nan")
    return {
        "ece": cal["ece"],
        "brier": brier,
        "nll": nll,
        "auroc_error": metrics.auroc(unc.ravel(), error.ravel()),
        "error_rate": float(error.mean()),
        "u_boundary": u_band,
        "u_interior": u_rest,
        "u_boundary_ratio": u_band / u_rest if u_rest > 0 else float("nan"),
        "reliability": {k: np.asarray(v).tolist() for k, v in cal.items() if k != "ece"},
    }


def evaluate_domains(
    p_eval_step,
    state,
    rng,
    config: ml_collections.ConfigDict,
    info: DatasetInfo,
    data_dir: str,
    mesh,
    strategy: str,
    evals: dict[str, dict],
    workdir: str,
    step: int,
    writer: MetricWriter,
    full: bool = True,
) -> dict[str, dict]:
    """Evaluates each named evaluator; with `full`, writes eval/<name>/ reports and images."""
    results = {}
    is_chief = jax.process_index() == 0
    for name, ev in evals.items():
        pred = predict_split(
            p_eval_step,
            state,
            rng,
            config,
            info,
            data_dir,
            mesh,
            strategy,
            ev["domain"],
            ev["split"],
        )
        rows = score_cases(pred, info, config, full)
        names = SURFACE_METRICS if full else ("dice",)
        summary = metrics.summarize_cases(rows, names)
        res = {
            "role": ev["role"],
            "domain": ev["domain"],
            "split": ev["split"],
            "num_examples": int(len(pred["case_id"])),
            "structures": summary,
        }
        res["distance_unit"] = _unit(pred)
        if full:
            res["uncertainty"] = uncertainty_quality(pred, info, config.eval.boundary_width)
        results[name] = res
        scalars = {f"eval/{name}/{s}/{m}": summary[s][m]["mean"] for s in summary for m in names}
        if full:
            scalars.update(
                {
                    f"eval/{name}/uncertainty/{k}": v
                    for k, v in res["uncertainty"].items()
                    if k != "reliability"
                }
            )
        writer.scalars(step, scalars)
        dice_txt = ", ".join(f"{s} {summary[s]['dice']['mean']:.4f}" for s in summary)
        print(
            f"[eval] step {step} {name} ({ev['role']}, {ev['split']}, "
            f"{res['num_examples']} examples): Dice {dice_txt}",
            flush=True,
        )
        if full and is_chief:
            _write_domain_reports(workdir, name, res, rows, pred, info, config, step, writer)
    return results


def _unit(pred) -> str:
    units = set(pred["spacing_unit"].tolist())
    if len(units) != 1:
        raise ValueError(f"Mixed spacing units {units} within one evaluator")
    return units.pop()


def _write_domain_reports(workdir, name, res, rows, pred, info, config, step, writer):
    out = os.path.join(workdir, "eval", name)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(out, "per_case.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "structure", "dice", "hd95", "asd", "empty_pred", "empty_gt"])
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
                    ]
                )
    if config.eval.save_predictions:
        np.savez_compressed(
            os.path.join(out, "predictions.npz"),
            image=pred["image"].astype(np.float16),
            label=pred["mask"].astype(np.uint8),
            probability=pred["probs"].astype(np.float16),
            uncertainty=pred["uncertainty"].astype(np.float16),
            case_id=pred["case_id"].astype(str),
            slice_index=pred["slice_index"],
        )
    panels = visualize.panels_for_domain(pred, rows, info, config, config.eval.num_panels)
    for i, (case_id, panel) in enumerate(panels):
        visualize.save_png(panel, os.path.join(out, f"panel_{i}_{case_id}.png"))
        writer.image(step, f"eval/{name}/panel_{i}", panel)
    writer.histogram(step, f"eval/{name}/uncertainty_hist", pred["uncertainty"])


def mean_dice(results: dict[str, dict]) -> float:
    """Mean Dice over evaluators and structures (model selection on source validation)."""
    vals = [r["structures"][s]["dice"]["mean"] for r in results.values() for s in r["structures"]]
    return float(np.mean(vals))


def make_summary(config, info, results, evals, selected, step) -> dict[str, Any]:
    del evals
    return {
        "method": config.method,
        "dataset": config.data.name,
        "source_domains": list(config.data.source_domains),
        "target_domains": list(config.data.target_domains),
        "seed": config.seed,
        "checkpoint": selected,
        "step": int(step),
        "structures": list(info.structures),
        "evals": {
            n: {
                "role": r["role"],
                "split": r["split"],
                "num_examples": r["num_examples"],
                "distance_unit": r.get("distance_unit"),
                **{
                    s: {
                        m: r["structures"][s][m]["mean"]
                        for m in SURFACE_METRICS
                        if m in r["structures"][s]
                    }
                    | {
                        "n": r["structures"][s]["n"],
                        "n_empty_pred": r["structures"][s]["n_empty_pred"],
                        "n_empty_gt": r["structures"][s]["n_empty_gt"],
                    }
                    for s in r["structures"]
                },
                **(
                    {
                        "uncertainty": {
                            k: v for k, v in r["uncertainty"].items() if k != "reliability"
                        }
                    }
                    if "uncertainty" in r
                    else {}
                ),
            }
            for n, r in results.items()
        },
    }


def write_summary(workdir: str, summary: dict) -> None:
    if jax.process_index() != 0:
        return
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(format_table([summary]), flush=True)


def format_table(summaries: list[dict]) -> str:
    """Markdown table: one row per (method, evaluator), Dice per structure."""
    if not summaries:
        return ""
    structures = summaries[0]["structures"]
    head = "| method | domain | role | " + " | ".join(f"{s} Dice" for s in structures) + " |"
    lines = [head, "|" + "---|" * (3 + len(structures))]
    for sm in summaries:
        for name, ev in sm["evals"].items():
            cells = " | ".join(f"{ev[s]['dice']:.4f}" for s in structures)
            lines.append(f"| {sm['method']} | {name} | {ev['role']} | {cells} |")
    return "\n".join(lines)
