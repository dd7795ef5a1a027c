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
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metrics as clu_metrics
from clu import parameter_overview
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from puseg_jax import parallel
from puseg_jax.core import logging_utils
from puseg_jax.data import pipeline, prepare
from puseg_jax.evaluators import domains, reports
from puseg_jax.model import conv_ops
from puseg_jax.train import checkpoints
from puseg_jax.train.config import _config_json, check_resume_config, resolve_evals, validate_config
from puseg_jax.train.steps import create_model, create_train_state, eval_step, train_step

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


def use_compile_cache(cache_dir: str) -> None:
    """Turns on JAX's persistent compilation cache in `cache_dir` ('' leaves JAX's setting, e.g.
    $JAX_COMPILATION_CACHE_DIR): a second run of the same program loads its compiled steps
    instead of compiling them.

    Args:
      cache_dir: the cache directory (created if missing), or ''.
    """
    if not cache_dir or jax.config.jax_compilation_cache_dir == cache_dir:
        return
    os.makedirs(cache_dir, exist_ok=True)
    compilation_cache.set_cache_dir(cache_dir)
    # JAX decides once per process whether the cache is used, at the first compilation: make it
    # decide again, so that the setting also holds in a process that compiled before (a notebook).
    compilation_cache.reset_cache()


@functools.cache
def _train_metrics_fns(names: tuple[str, ...]) -> tuple[Callable, Callable, Callable]:
    """(update, merge, means) of a clu Collection averaging the step's metrics `names`, compiled:
    eagerly, clu's small array operations cost ~10 ms per log line on 2 loaded cores, jitted ~1."""
    collection = clu_metrics.Collection.create(
        **{name: clu_metrics.Average.from_output(name) for name in names}
    )
    update = jax.jit(lambda mask, values: collection.single_from_model_output(mask=mask, **values))
    return update, jax.jit(lambda a, b: a.merge(b)), jax.jit(lambda c: c.compute())


def aggregate_train_metrics(
    window: clu_metrics.Collection | None, fetched: list
) -> clu_metrics.Collection | None:
    """Adds the host metrics of some steps to the running means of a log window; steps whose
    loss or gradients were not finite (skipped, the state unchanged) are masked out.

    Args:
      window: the window's collection so far, or None for an empty window.
      fetched: [(step, {name: host scalar})] as `_fetch` returns them, with the in-step
        `finite_loss` / `finite_grads` flags.

    Returns:
      The window's collection (`window_means` reads it); `window` if `fetched` is empty.
    """
    if not fetched:
        return window
    names = tuple(sorted(k for k in fetched[0][1] if not k.startswith("finite")))
    update, merge, _ = _train_metrics_fns(names)
    stacked = {k: np.stack([np.asarray(m[k]) for _, m in fetched]) for k in names}
    applied = np.array([bool(m["finite_loss"]) and bool(m["finite_grads"]) for _, m in fetched])
    new = update(applied, stacked)
    return new if window is None else merge(window, new)


def window_means(window: clu_metrics.Collection) -> dict[str, float]:
    """{name: mean over the window's applied steps} (NaN where every step was skipped)."""
    names = tuple(sorted(k for k in vars(window) if k != "_reduction_counter"))
    means = jax.device_get(_train_metrics_fns(names)[2](window))
    return {k: float(v) for k, v in means.items()}


def _fetch(pending: list) -> list:
    """[(first step, device metrics, steps or None)] -> [(step, host metrics)], one per step."""
    out = []
    for first, metrics, steps in pending:
        metrics = jax.device_get(metrics)
        if steps is None:
            out.append((first, metrics))
        else:
            out += [(first + i, jax.tree.map(lambda v, i=i: v[i], metrics)) for i in range(steps)]
    return out


def _check_finite(fetched: list, nan_policy: str, counters: dict) -> None:
    """Host check of the in-step finiteness flags of the steps since the last check."""
    for step, m in fetched:
        fl, fg = bool(m["finite_loss"]), bool(m["finite_grads"])
        if fl and fg:
            continue
        what = "loss" if not fl else "gradients"
        if nan_policy == "raise":
            raise FloatingPointError(
                f"Non-finite {what} at step {step} (loss={float(m['loss'])}, "
                f"grad_norm={float(m['grad_norm'])}); the state was not updated and the last "
                f"checkpoint is the last good one. Set nan_policy='skip' to skip such steps."
            )
        counters["skipped_steps"] += 1
        print(
            f"[train] Non-finite {what} at step {step}: step skipped "
            f"({counters['skipped_steps']} so far).",
            flush=True,
        )


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
    info = validate_config(config)
    use_compile_cache(config.compile_cache_dir)
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
    writer = reports.make_writer(workdir)
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
    state = parallel.replicate(host_state, mesh, strategy)
    del host_state

    def save(step: int) -> None:
        extra = {"data_state": train_iter.get_state(), "counters": counters}
        ckpts.save(step, parallel.unreplicate(state, strategy), extra, cfg_json)

    def run_evals(names: list[str], step: int, full: bool) -> dict[str, dict]:
        return domains.evaluate_domains(
            p_eval_step,
            state,
            eval_rng,
            config,
            info,
            data_dir,
            mesh,
            strategy,
            {n: evals[n] for n in names},
            workdir,
            step,
            writer,
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
    try:
        step = start_step
        while step < num_steps:
            calls = steps_per_call
            if calls > 1 and (step % calls or step + calls > num_steps):
                calls = 1
            if calls == 1:
                batch = next(train_iter)
                batch = parallel.shard_batch(
                    {"image": batch["image"], "mask": batch["mask"]}, mesh, strategy
                )
                state, metrics = p_train_step(state, batch, train_rng)
                pending.append((step + 1, metrics, None))
            else:
                batches = [next(train_iter) for _ in range(calls)]
                stacked = {k: np.stack([b[k] for b in batches]) for k in ("image", "mask")}
                batch = parallel.shard_batch(stacked, mesh, strategy, stacked=True)
                state, metrics = p_train_steps(state, batch, train_rng)
                pending.append((step + 1, metrics, calls))
            first_call = step == start_step
            step += calls
            if first_call:
                # The first call compiles: the rate (and ETA) counts from its end.
                jax.block_until_ready(metrics)
                t_last, step_last = time.time(), step

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
                with logging_utils.stdout_to_log():
                    results = run_evals(source_val, step, full=False)
                val_dice = reports.mean_dice(results)
                if not final_step:
                    print(_source_val_line(step, results, val_dice), flush=True)
                writer.scalars(step, {"eval/source_val_mean_dice": val_dice})
                if config.model_selection == "source_val":
                    extra = {"data_state": train_iter.get_state(), "counters": counters}
                    ckpts.save_best(
                        step, parallel.unreplicate(state, strategy), extra, cfg_json, val_dice
                    )
            paused += time.time() - t_pause
    except BaseException:
        close()
        raise
    finally:
        preemption.restore()

    # ---- final evaluation ------------------------------------------------------------------
    summary = evaluate_checkpoint(
        config,
        workdir,
        info,
        mesh,
        strategy,
        state,
        p_eval_step,
        eval_rng,
        writer,
        ckpts,
        evals,
        num_steps,
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
    summary["skipped_steps"] = counters["skipped_steps"]
    reports.write_summary(workdir, summary)
    close()
    return summary


def evaluate_checkpoint(
    config, workdir, info, mesh, strategy, state, p_eval_step, eval_rng, writer, ckpts, evals, step
):
    """Evaluates the selected checkpoint (last, or best on source validation) on all evals."""
    selected = "last"
    if config.model_selection == "source_val" and ckpts.latest_step("best") is not None:
        best = ckpts.latest_step("best")
        host = parallel.unreplicate(state, strategy)
        restored, _ = ckpts.restore(best, host, NamedSharding(mesh, P()), which="best")
        state = parallel.replicate(restored, mesh, strategy)
        selected, step = f"best@{best}", best
        print(f"[eval] reporting checkpoint {selected} (best source-validation Dice)", flush=True)
    data_dir = prepare.resolve_data_dir(config)
    results = domains.evaluate_domains(
        p_eval_step,
        state,
        eval_rng,
        config,
        info,
        data_dir,
        mesh,
        strategy,
        evals,
        workdir,
        step,
        writer,
        full=True,
    )
    return reports.make_summary(config, info, results, evals, selected, step)


def evaluate_only(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """`--mode=eval`: evaluates the workdir's checkpoint on all evals, no training."""
    info = validate_config(config)
    parallel.maybe_initialize_distributed(config)
    mesh = parallel.create_mesh(config.parallel.num_devices)
    parallel.check_batch_divisible(config.eval.batch_size, mesh, "eval.batch_size")
    strategy = config.parallel.strategy
    evals = resolve_evals(config)
    model = create_model(config, info)
    init_rng, _, eval_rng = jax.random.split(jax.random.key(config.seed), 3)
    host_state = create_train_state(config, info, model, init_rng)
    ckpts = checkpoints.Checkpoints(workdir, config.keep_checkpoints)
    step = ckpts.latest_step()
    if step is None:
        raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints/last to evaluate")
    host_state, _ = ckpts.restore(step, host_state, NamedSharding(mesh, P()))
    state = parallel.replicate(host_state, mesh, strategy)
    p_eval_step = parallel.wrap_eval_step(
        functools.partial(eval_step, config=config, label_mode=info.label_mode),
        mesh,
        strategy,
        compiler_options=conv_ops.compiler_options(config.model.conv_impl),
    )
    writer = reports.make_writer(workdir)
    summary = evaluate_checkpoint(
        config,
        workdir,
        info,
        mesh,
        strategy,
        state,
        p_eval_step,
        eval_rng,
        writer,
        ckpts,
        evals,
        step,
    )
    reports.write_summary(workdir, summary)
    writer.close()
    ckpts.close()
    return summary
