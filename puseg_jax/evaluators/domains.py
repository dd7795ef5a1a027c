"""Evaluation of named evaluators: predict, score, log and write the reports of each."""

import jax
import ml_collections

from puseg_jax.core.datasets import DatasetInfo
from puseg_jax.core.logging_utils import MetricWriter
from puseg_jax.evaluators.case_panels import write_panels
from puseg_jax.evaluators.predict import predict_split
from puseg_jax.evaluators.records import SLICE_COUNTS
from puseg_jax.evaluators.reports import write_domain_reports
from puseg_jax.evaluators.scoring import SURFACE_METRICS, score_split

# ---------------------------------------------------------------------------------------------
# Evaluators.


def evaluate_domains(
    *,
    p_eval_step,
    state,
    rng: jax.Array,
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
    """Evaluates each named evaluator.

    Args:
      p_eval_step: the wrapped eval step.
      state: the model state in the step's layout.
      rng: evaluation key (uncertainty samples).
      config: the experiment config.
      info: the dataset family.
      data_dir: the TFDS data dir.
      mesh: the device mesh.
      strategy: parallel.strategy.
      evals: {name: {'domain', 'split', 'role'}}.
      workdir: where eval/<name>/ goes.
      step: the step logged.
      writer: TensorBoard/metrics.jsonl writer (scalars under eval/<name>/...).
      full: Dice, HD95, ASD, uncertainty quality and reports on disk; else Dice only
        (periodic source validation).

    Returns:
      {name: `score_split` result}.
    """
    results = {}
    names = SURFACE_METRICS if full else ("dice",)
    for name, ev in evals.items():
        pred = predict_split(
            p_eval_step=p_eval_step,
            state=state,
            rng=rng,
            config=config,
            info=info,
            data_dir=data_dir,
            mesh=mesh,
            strategy=strategy,
            domain=ev["domain"],
            split=ev["split"],
        )
        res, rows = score_split(pred, info, config, ev, step, full)
        results[name] = res
        writer.scalars(step, eval_scalars(name, res, names))
        summary = res["structures"]
        dice_txt = ", ".join(f"{s} {summary[s]['dice']['mean']:.4f}" for s in summary)
        print(
            f"[eval] step {step} {name} ({ev['role']}, {ev['split']}, {res['num_cases']} cases, "
            f"{res['num_examples']} examples): Dice {dice_txt}",
            flush=True,
        )
        if full and jax.process_index() == 0:
            write_domain_reports(workdir, name, res, rows, pred, info, config, step, writer)
        elif jax.process_index() == 0:
            # Periodic (source-validation) evaluations: fixed cases and the uncertainty
            # histogram in TensorBoard, so a run can be followed while it trains.
            write_panels(writer, step, name, ev["role"], pred, rows, info, config)
    return results


def eval_scalars(
    name: str, res: dict, names: tuple[str, ...] = SURFACE_METRICS
) -> dict[str, float]:
    """An evaluator's scalars for TensorBoard and metrics.jsonl, `eval/<name>/...`.

    Args:
      name: the evaluator.
      res: its `score_split` result (one without 'structures', of a domain without labels,
        has only its uncertainty scalars).
      names: the per-case metrics scored.

    Returns:
      {tag: value}: per structure the mean of each metric and the empty-mask (and slice)
      counts, and the uncertainty quality.
    """
    out = {}
    for s, sm in res.get("structures", {}).items():
        for m in names:
            out[f"eval/{name}/{s}/{m}"] = sm[m]["mean"]
        out[f"eval/{name}/{s}/n_empty_pred"] = sm["n_empty_pred"]
        out[f"eval/{name}/{s}/n_empty_gt"] = sm["n_empty_gt"]
        for key in SLICE_COUNTS:
            if f"n_{key}" in sm:
                out[f"eval/{name}/{s}/n_{key}"] = sm[f"n_{key}"]
    for k, v in res.get("uncertainty", {}).items():
        if k != "reliability":
            out[f"eval/{name}/uncertainty/{k}"] = v
    return out
