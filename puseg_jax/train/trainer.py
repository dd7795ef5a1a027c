"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

Restore precedence: the workdir's own checkpoint > `config.init_from` > from scratch.

The train/* scalars logged every `log_every_steps` steps are means over the steps since the
previous log line, by `clu.metrics` outside the train step (which returns each step's metrics).
"""

import functools
import json
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from puseg_jax import parallel
from puseg_jax.core import compile_cache, logging_utils, timing
from puseg_jax.data import pipeline, prepare
from puseg_jax.evaluators import domains, reports
from puseg_jax.model import conv_ops
from puseg_jax.train import checkpoints, diagnostics
from puseg_jax.train.config import _config_json, check_resume_config, resolve_evals, validate_config
from puseg_jax.train.restore import restore_for_inference
from puseg_jax.train.steps import create_model, create_train_state, eval_step, train_step
from puseg_jax.train.train_metrics import (
    _check_finite,
    _fetch,
    aggregate_train_metrics,
    window_means,
)

# ---------------------------------------------------------------------------------------------


class _Preemption:
    """SIGTERM sets a flag; the loop checkpoints at the next step and exits cleanly.

    Python signal handlers can only be set from the main thread; elsewhere (a training thread of
    a notebook server) SIGTERM keeps its default action.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        print("[train] SIGTERM received: checkpointing at the next step, then exiting.", flush=True)
        self.requested = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _duration(seconds: float) -> str:
    """'1:05' for 65 s, '1:02:03' past an hour."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _source_val_line(step: int, results: dict[str, dict], mean_dice: float) -> str:
    """'[eval] step 100 source_val Dice: Domain2 OD 0.9512 OC 0.8713 | ... | mean 0.9105'."""
    parts = [
        f"{name} "
        + " ".join(f"{s} {r['structures'][s]['dice']['mean']:.4f}" for s in r["structures"])
        for name, r in results.items()
    ]
    return f"[eval] step {step} source_val Dice: {' | '.join(parts)} | mean {mean_dice:.4f}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains on the source domains, then evaluates every evaluator in `config.evals`.

    The train/* scalars and the console's loss are means over the steps since the previous log
    line (skipped non-finite steps left out); log.txt gets the model's parameter table (clu).

    Args:
      config: experiment config (configs/default.py documents every field).
      workdir: where config.json, checkpoints, TensorBoard events, metrics.jsonl, eval/ and
        summary.json go. An existing checkpoint there is resumed.

    Returns:
      The summary written to `<workdir>/summary.json`.
    """
    # ---- setup ----------------------------------------------------------------------------------
    timer = timing.PhaseTimer(inside={"input pipeline": "train steps"})
    info = validate_config(config)
    compile_cache.use_compile_cache(config.compile_cache_dir)
    parallel.maybe_initialize_distributed(config)
    parallel.check_strategy(config.parallel.strategy)
    mesh = parallel.create_mesh(config.parallel.num_devices)
    parallel.check_batch_divisible(config.batch_size, mesh)
    parallel.check_batch_divisible(config.eval.batch_size, mesh, "eval.batch_size")
    strategy = config.parallel.strategy
    evals = resolve_evals(config)
    is_chief = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    cfg_json = _config_json(config)
    ckpts = checkpoints.Checkpoints(workdir, config.keep_checkpoints)
    latest = ckpts.latest_step()
    # Before anything is written or compiled: a workdir is one experiment.
    changes = []
    if latest is not None:
        try:
            saved = ckpts.restore_json(latest, "config")
            changes = check_resume_config(saved, cfg_json, config.allow_config_change)
        except BaseException:
            ckpts.close()
            raise
    if is_chief:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(cfg_json, f, indent=2)
        prepare.prepare_all(config, info)
    parallel.sync("prepare")
    data_dir = prepare.resolve_data_dir(config)

    model = create_model(config, info)
    rng = jax.random.key(config.seed)
    init_rng, train_rng, eval_rng = jax.random.split(rng, 3)
    host_state = create_train_state(config, info, model, init_rng)
    if is_chief:  # to log.txt (INFO): names, shapes, sizes, mean and std of the parameters
        parameter_overview.log_parameter_overview(
            host_state.params, msg=f"[train] parameters of the {config.method} model:"
        )
    writer = logging_utils.MetricWriter(workdir)
    replicated = NamedSharding(mesh, P())

    # ---- restore ----------------------------------------------------------------------------
    counters = {"skipped_steps": 0}
    data_state = None
    if latest is not None:
        # Whatever device count wrote it: the state is read straight into this run's layout.
        host_state, extra = ckpts.restore(latest, host_state, replicated)
        data_state, counters = extra["data_state"], extra["counters"]
        print(f"[train] resumed from {workdir} at step {latest} (data {data_state})", flush=True)
        if changes:
            print(f"[train] config differs from the checkpoint's: {'; '.join(changes)}", flush=True)
    elif config.init_from:
        src = checkpoints.restore_params_from(config.init_from, host_state, replicated)
        host_state = host_state.replace(params=src.params, batch_stats=src.batch_stats)
        print(f"[train] initialised params from {config.init_from}", flush=True)
    start_step = int(host_state.step)

    # ---- data -------------------------------------------------------------------------------
    train_ds = pipeline.train_dataset(
        info, config, data_dir, jax.process_index(), jax.process_count()
    )
    train_iter = pipeline.make_train_iterator(train_ds, config)
    if data_state is not None:
        train_iter.set_state(data_state)

    # ---- compile ----------------------------------------------------------------------------
    options = conv_ops.compiler_options(config.model.conv_impl)
    impl = conv_ops.resolve_impl(config.model.conv_impl)
    plan = f", CPU plan {conv_ops.cpu_plan()}" if impl == "fast" else ""
    logging.info("convolutions: impl %s%s, compiler options %s", impl, plan, options)
    step_fn = functools.partial(train_step, config=config, label_mode=info.label_mode)
    p_train_step = parallel.wrap_train_step(step_fn, mesh, strategy, compiler_options=options)
    steps_per_call = config.steps_per_call
    # Compiled (on first use) only for calls of steps_per_call steps; a resume at a step that
    # is not a multiple of it runs single steps up to the next multiple.
    p_train_steps = parallel.wrap_train_step(
        step_fn, mesh, strategy, steps_per_call, compiler_options=options
    )
    p_eval_step = parallel.wrap_eval_step(
        functools.partial(eval_step, config=config, label_mode=info.label_mode),
        mesh,
        strategy,
        compiler_options=options,
    )
    # Highlighting diagnostics: their own compiled function, off the train step (diagnostics.py).
    diag_every = config.loss.diagnostics_every_steps
    p_diagnostics = diagnostics.wrap_diagnostics_step(
        functools.partial(diagnostics.diagnostics_step, config=config, label_mode=info.label_mode),
        mesh,
        strategy,
        compiler_options=options,
    )
    state = parallel.replicate(host_state, mesh, strategy)
    del host_state

    def diagnose(step: int, calls: int, host_batch: dict[str, np.ndarray]) -> float:
        """Logs the diagnostics of train step `step + 1` when due; returns the seconds spent."""
        if not diagnostics.due(step, calls, diag_every):
            return 0.0
        # The train steps dispatched so far finish first, outside the pause: the diagnostics
        # would otherwise wait for them inside it, and their time would leave the rate, the ETA
        # and timing.json's train steps for 'diagnostics'.
        jax.block_until_ready(state)
        t0 = time.time()
        batch = parallel.shard_batch(host_batch, mesh, strategy)
        values = jax.device_get(p_diagnostics(state, batch, train_rng))
        writer.scalars(step + 1, {f"train/{k}": v for k, v in values.items()})
        timer.add("diagnostics", time.time() - t0)
        return time.time() - t0

    def save(step: int) -> None:
        extra = {"data_state": train_iter.get_state(), "counters": counters}
        with timer.phase("checkpoints"):
            ckpts.save(step, parallel.unreplicate(state, strategy), extra, cfg_json)

    def next_batch() -> dict[str, np.ndarray]:
        with timer.phase("input pipeline"):
            return next(train_iter)

    def run_evals(names: list[str], step: int, full: bool) -> dict[str, dict]:
        return domains.evaluate_domains(
            p_eval_step=p_eval_step,
            state=state,
            rng=eval_rng,
            config=config,
            info=info,
            data_dir=data_dir,
            mesh=mesh,
            strategy=strategy,
            evals={n: evals[n] for n in names},
            workdir=workdir,
            step=step,
            writer=writer,
            full=full,
        )

    def close() -> None:
        writer.close()
        ckpts.close()

    # ---- train loop ---------------------------------------------------------------------------
    num_steps = config.num_train_steps
    preemption = _Preemption()
    pending: list = []  # device metrics of the steps not fetched yet
    window = None  # the log window's running means (clu), over the fetched steps
    t_start = t_last = time.time()
    step_last, paused = start_step, 0.0  # paused: evaluation and checkpoint seconds since t_last
    source_val = [n for n, e in evals.items() if e["role"] == "source_val"]
    print(
        f"[train] {config.method} on {list(config.data.source_domains)} -> "
        f"{list(config.data.target_domains)}: steps {start_step}..{num_steps}, "
        f"{mesh.devices.size} device(s), strategy={strategy}",
        flush=True,
    )
    timer.add("setup", time.perf_counter() - timer.start)
    t_loop = time.perf_counter()
    try:
        step = start_step
        while step < num_steps:
            calls = steps_per_call
            if calls > 1 and (step % calls or step + calls > num_steps):
                calls = 1
            if calls == 1:
                batch = next_batch()
                batch = {"image": batch["image"], "mask": batch["mask"]}
                paused += diagnose(step, calls, batch)
                batch = parallel.shard_batch(batch, mesh, strategy)
                state, metrics = p_train_step(state, batch, train_rng)
                pending.append((step + 1, metrics, None))
            else:
                batches = [next_batch() for _ in range(calls)]
                stacked = {k: np.stack([b[k] for b in batches]) for k in ("image", "mask")}
                paused += diagnose(step, calls, {k: v[0] for k, v in stacked.items()})
                batch = parallel.shard_batch(stacked, mesh, strategy, stacked=True)
                state, metrics = p_train_steps(state, batch, train_rng)
                pending.append((step + 1, metrics, calls))
            first_call = step == start_step
            step += calls
            if first_call:
                # The first call compiles: the rate (and ETA) counts from its end.
                jax.block_until_ready(metrics)
                t_last, step_last, paused = time.time(), step, 0.0
                timer.add("first call (compilation)", time.perf_counter() - t_loop)

            if step % config.log_every_steps == 0 or step == num_steps:
                fetched, pending = _fetch(pending), []
                _check_finite(fetched, config.nan_policy, counters)
                means, window = window_means(aggregate_train_metrics(window, fetched)), None
                now = time.time()
                scalars = {f"train/{k}": v for k, v in means.items()}
                scalars["train/skipped_steps"] = counters["skipped_steps"]
                speed = ""
                train_seconds = now - t_last - paused
                if step > step_last and train_seconds > 0:
                    # Training steps only: evaluations and checkpoints would make the ETA jump.
                    rate = (step - step_last) / train_seconds
                    scalars["train/steps_per_sec"] = rate
                    speed = f", {rate:.2f} steps/s, ETA {_duration((num_steps - step) / rate)}"
                t_last, step_last, paused = now, step, 0.0
                writer.scalars(step, scalars)
                logging_utils.progress(
                    f"[train] step {step}/{num_steps} ({100 * step // num_steps}%) "
                    f"loss {means['loss']:.4f}, elapsed {_duration(now - t_start)}{speed}"
                )

            t_pause = time.time()
            # Every process takes the same decision at the same step (a collective when several).
            stop = parallel.any_across_processes(preemption.requested)
            if stop or step % config.checkpoint_every_steps == 0 or step == num_steps:
                fetched, pending = _fetch(pending), []
                # Before saving: a checkpoint is only written after finite steps.
                _check_finite(fetched, config.nan_policy, counters)
                window = aggregate_train_metrics(window, fetched)
                save(step)
            if stop:
                print(f"[train] preempted: checkpoint at step {step} written, exiting.", flush=True)
                close()
                return {"preempted_at_step": step}
            # At the last step the final evaluation below scores this same state on every
            # evaluator: with model_selection='last' the periodic one would repeat it, and with
            # 'source_val' it only offers the state as the best checkpoint (said in the log
            # only, so that the console shows each step's results once).
            final_step = step == num_steps
            if (
                source_val
                and config.eval_every_steps
                and step % config.eval_every_steps == 0
                and not (final_step and config.model_selection == "last")
            ):
                # One console line for all source domains; each evaluator's own line is logged.
                with logging_utils.stdout_to_log(), timer.phase("periodic evaluation"):
                    results = run_evals(source_val, step, full=False)
                val_dice = reports.mean_dice(results)
                if not final_step:
                    print(_source_val_line(step, results, val_dice), flush=True)
                writer.scalars(step, {"eval/source_val_mean_dice": val_dice})
                if config.model_selection == "source_val":
                    extra = {"data_state": train_iter.get_state(), "counters": counters}
                    with timer.phase("checkpoints"):
                        ckpts.save_best(
                            step, parallel.unreplicate(state, strategy), extra, cfg_json, val_dice
                        )
            paused += time.time() - t_pause
    except BaseException:
        close()
        raise
    finally:
        preemption.restore()

    # The train steps: the loop's wall time less what was timed inside it apart.
    apart = ("first call (compilation)", "checkpoints", "periodic evaluation", "diagnostics")
    loop_s = time.perf_counter() - t_loop
    timer.add("train steps", loop_s - sum(timer.seconds.get(n, 0.0) for n in apart))

    # ---- final evaluation ------------------------------------------------------------------
    t_final = time.perf_counter()
    selected, step = "last", num_steps
    if config.model_selection == "source_val" and ckpts.latest_step("best") is not None:
        best = restore_for_inference(config, info, workdir, mesh, which="best")
        # Into the training state's layout: the compiled eval step is reused.
        state = state.replace(params=best.state.params, batch_stats=best.state.batch_stats)
        selected, step = best.label, best.step
        print(f"[eval] reporting checkpoint {selected} (best source-validation Dice)", flush=True)
    summary = evaluate_and_summarize(
        config=config,
        workdir=workdir,
        info=info,
        mesh=mesh,
        state=state,
        p_eval_step=p_eval_step,
        eval_rng=eval_rng,
        writer=writer,
        evals=evals,
        step=step,
        checkpoint=selected,
    )
    if (
        source_val
        and config.eval_every_steps
        and num_steps % config.eval_every_steps == 0
        and summary["checkpoint"] == "last"
    ):
        # The selection scalar of the last step (the periodic evaluation was left to this one).
        dice = [summary["evals"][n][s]["dice"] for n in source_val for s in summary["structures"]]
        writer.scalars(num_steps, {"eval/source_val_mean_dice": float(np.mean(dice))})
    timer.add("final evaluation", time.perf_counter() - t_final)
    summary["skipped_steps"] = counters["skipped_steps"]
    with timer.phase("summary and close"):
        reports.write_summary(workdir, summary)
        close()
    if is_chief:
        timer.write(workdir)
        print(timer.line(), flush=True)
    return summary


def evaluate_and_summarize(
    *,
    config: ml_collections.ConfigDict,
    workdir: str,
    info,
    mesh,
    state,
    p_eval_step,
    eval_rng: jax.Array,
    writer: logging_utils.MetricWriter,
    evals: dict[str, dict],
    step: int,
    checkpoint: str,
) -> dict[str, Any]:
    """The final evaluation: every evaluator with its reports on disk, and the run's summary.

    Args:
      config: the run's config.
      workdir: where eval/<name>/ goes.
      info: the dataset family.
      mesh: the device mesh.
      state: the reported model, in the eval step's layout.
      p_eval_step: the wrapped eval step.
      eval_rng: the evaluation key.
      writer: the run's metric writer.
      evals: the evaluators (`resolve_evals`).
      step: the reported checkpoint's step.
      checkpoint: its label, 'last' or 'best@<step>'.

    Returns:
      The summary (`reports.make_summary`), not yet written.
    """
    results = domains.evaluate_domains(
        p_eval_step=p_eval_step,
        state=state,
        rng=eval_rng,
        config=config,
        info=info,
        data_dir=prepare.resolve_data_dir(config),
        mesh=mesh,
        strategy=config.parallel.strategy,
        evals=evals,
        workdir=workdir,
        step=step,
        writer=writer,
        full=True,
    )
    return reports.make_summary(config, info, results, evals, checkpoint, step)


def evaluate_only(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """`--mode=eval`: evaluates the workdir's reported checkpoint on all evaluators, no
    training (the best on source validation with `model_selection='source_val'` when there is
    one, else the last), and rewrites eval/ and summary.json.

    Args:
      config: the run's config.
      workdir: the trained workdir.

    Returns:
      The summary written to `<workdir>/summary.json`.
    """
    info = validate_config(config)
    parallel.maybe_initialize_distributed(config)
    mesh = parallel.create_mesh(config.parallel.num_devices)
    parallel.check_batch_divisible(config.eval.batch_size, mesh, "eval.batch_size")
    ckpts = checkpoints.Checkpoints(workdir, config.keep_checkpoints)
    try:
        last, best = ckpts.latest_step(), ckpts.latest_step("best")
    finally:
        ckpts.close()
    if last is None:
        raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints/last to evaluate")
    which = "best" if config.model_selection == "source_val" and best is not None else "last"
    model = restore_for_inference(config, info, workdir, mesh, which=which)
    if which == "best":
        print(
            f"[eval] reporting checkpoint {model.label} (best source-validation Dice)", flush=True
        )
    _, _, eval_rng = jax.random.split(jax.random.key(config.seed), 3)
    writer = logging_utils.MetricWriter(workdir)
    try:
        summary = evaluate_and_summarize(
            config=config,
            workdir=workdir,
            info=info,
            mesh=mesh,
            state=model.state,
            p_eval_step=model.eval_step,
            eval_rng=eval_rng,
            writer=writer,
            evals=resolve_evals(config),
            step=model.step,
            checkpoint=model.label,
        )
        reports.write_summary(workdir, summary)
    finally:
        writer.close()
    return summary
