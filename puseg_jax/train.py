"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

Restore precedence: the workdir's own checkpoint > `config.init_from` > from scratch.
"""

import functools
import json
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from puseg_jax import (
    checkpointing,
    config_diff,
    conv_ops,
    evaluation,
    input_pipeline,
    logging_utils,
    losses,
    models,
    parallel,
    prepare,
)
from puseg_jax.datasets import DatasetInfo, get_dataset_info


class TrainState(train_state.TrainState):
    batch_stats: Any


# ---------------------------------------------------------------------------------------------
# Config checks, done before anything is built or compiled.


def resolve_evals(config: ml_collections.ConfigDict) -> dict[str, dict]:
    """Named evaluators: `config.evals` if given, else one per source domain (its validation
    split, role 'source_val') and one per target domain (its target split, role 'target')."""
    if len(config.evals):
        return {k: dict(v) for k, v in config.evals.items()}
    evals = {}
    for d in config.data.source_domains:
        evals[d] = dict(domain=d, split=config.data.val_split, role="source_val")
    for d in config.data.target_domains:
        evals[d] = dict(domain=d, split=config.data.target_split, role="target")
    return evals


def validate_config(config: ml_collections.ConfigDict) -> DatasetInfo:
    """Raises a clear ValueError for config mistakes."""
    info = get_dataset_info(config.data.name)
    # The method and every loss field (the highlighting variants, MC dropout's dropout).
    losses.validate_loss_config(config)
    if config.parallel.strategy not in parallel.STRATEGIES:
        raise ValueError(
            f"Unknown parallel.strategy {config.parallel.strategy!r}; "
            f"expected one of {parallel.STRATEGIES}"
        )
    pc = config.parallel
    if pc.distributed not in ("auto", "off"):
        raise ValueError(f"Unknown parallel.distributed {pc.distributed!r}; expected auto | off")
    if pc.coordinator_address and not 0 <= pc.process_id < pc.num_processes:
        raise ValueError(
            f"parallel.process_id={pc.process_id} is not in [0, {pc.num_processes}) "
            f"(parallel.num_processes)"
        )
    extra = tuple(config.data.get("extra_domains", ()))
    known = info.domains + extra
    for d in list(config.data.source_domains) + list(config.data.target_domains):
        if d not in known:
            raise ValueError(
                f"Unknown domain {d!r} for dataset {config.data.name!r}; expected one of "
                f"{known} (a new domain of your own must be listed in data.extra_domains)"
            )
    overlap = set(config.data.source_domains) & set(config.data.target_domains)
    if overlap:
        raise ValueError(f"Target domain(s) {sorted(overlap)} are also source domains")
    if not config.data.source_domains:
        raise ValueError("data.source_domains is empty")
    size = config.data.image_size
    if size % 2 ** (len(config.model.widths) - 1):
        raise ValueError(
            f"data.image_size={size} must be divisible by 2**{len(config.model.widths) - 1}"
        )
    if config.model_selection not in ("last", "source_val"):
        raise ValueError(f"Unknown model_selection {config.model_selection!r}")
    if config.nan_policy not in ("raise", "skip"):
        raise ValueError(f"Unknown nan_policy {config.nan_policy!r}")
    if config.eval.uncertainty == "mc_dropout" and config.model.dropout_rate <= 0:
        raise ValueError("eval.uncertainty='mc_dropout' needs model.dropout_rate > 0")
    if config.eval.get("resolution", "native") not in evaluation.RESOLUTIONS:
        raise ValueError(
            f"Unknown eval.resolution {config.eval.resolution!r}; expected one of "
            f"{evaluation.RESOLUTIONS} (native: the released images' or volumes' own grid; "
            "network: the network's input grid, as before)"
        )
    validate_evals(resolve_evals(config), config)
    k = config.steps_per_call
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"steps_per_call={k!r} must be an integer >= 1")
    for name in ("log_every_steps", "checkpoint_every_steps", "eval_every_steps"):
        # Logging, checkpoints and evaluations happen between compiled calls only.
        if config[name] % k:
            raise ValueError(f"{name}={config[name]} is not a multiple of steps_per_call={k}")
    return info


EVAL_ROLES = ("source_val", "target")


def validate_evals(evals: dict[str, dict], config: ml_collections.ConfigDict) -> None:
    """Refuses evaluators whose role does not match the config's domains.

    A 'source_val' evaluator may only read a source domain (its results may choose the
    checkpoint) and a 'target' evaluator only a held-out domain: a config whose domains were
    overridden on the command line while an explicit `config.evals` kept the old roles would
    otherwise select on the target or report a source as the target.
    """
    sources, targets = set(config.data.source_domains), set(config.data.target_domains)
    for name, ev in evals.items():
        missing = {"domain", "split", "role"} - set(ev)
        if missing:
            raise ValueError(f"Evaluator {name!r} lacks {sorted(missing)} (config.evals.{name})")
        role, domain = ev["role"], ev["domain"]
        if role not in EVAL_ROLES:
            raise ValueError(
                f"Evaluator {name!r} has unknown role {role!r}; expected one of {EVAL_ROLES}"
            )
        if role == "source_val" and domain not in sources:
            raise ValueError(
                f"Evaluator {name!r} has role 'source_val' on {domain!r}, which is not a source "
                f"domain {sorted(sources)}: only sources may validate (and choose checkpoints). "
                "Fix config.evals or leave it empty to derive it from data.source_domains and "
                "data.target_domains."
            )
        if role == "target" and domain not in targets:
            where = "a source domain" if domain in sources else "not a target domain"
            raise ValueError(
                f"Evaluator {name!r} has role 'target' on {domain!r}, which is {where} "
                f"(targets {sorted(targets)}). Fix config.evals or leave it empty to derive it "
                "from data.source_domains and data.target_domains."
            )


# ---------------------------------------------------------------------------------------------
# Model, optimizer, state.


def create_model(config: ml_collections.ConfigDict, info: DatasetInfo) -> models.UNet:
    return models.UNet(
        num_classes=info.num_outputs,
        widths=tuple(config.model.widths),
        logvar_channels=losses.num_logvar_channels(config, info.num_outputs),
        norm=config.model.norm,
        dropout_rate=config.model.dropout_rate,
        bn_axis_name=parallel.AXIS,
        conv_impl=conv_ops.resolve_impl(config.model.conv_impl),
        dtype=jnp.dtype(config.model.dtype),
        remat=config.model.remat,
    )


def input_channels(config: ml_collections.ConfigDict, info: DatasetInfo) -> int:
    return info.channels * (2 * config.data.context_slices + 1)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam(W) with polynomial decay lr * (1 - t / T) ** power, optional clipping."""
    o = config.optim
    schedule = optax.polynomial_schedule(
        init_value=o.learning_rate,
        end_value=0.0,
        power=o.poly_power,
        transition_steps=config.num_train_steps,
    )
    parts = []
    if o.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
    if o.weight_decay > 0:
        parts.append(optax.adamw(schedule, weight_decay=o.weight_decay))
    else:
        parts.append(optax.adam(schedule))
    return optax.chain(*parts)


def create_train_state(
    config: ml_collections.ConfigDict, info: DatasetInfo, model: models.UNet, rng: jax.Array
) -> TrainState:
    """Initial state on the host (one copy; `parallel.replicate` places it)."""
    size = config.data.image_size
    dummy = jnp.zeros((1, size, size, input_channels(config, info)), jnp.float32)
    # The initialisers run on one device, so the sharding-invariant ("partitionable") threefry
    # buys nothing here, and XLA:CPU compiles it ~7x slower (88 s against 13 s for the test
    # U-Net on 2 loaded cores). Values stay a function of the seed alone.
    with jax.threefry_partitionable(False):
        variables = jax.jit(functools.partial(model.init, train=False))(rng, dummy)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=create_optimizer(config),
    )


# ---------------------------------------------------------------------------------------------
# The per-device steps (wrapped by parallel.py; reduce over parallel.AXIS).

# fold_in(step key, _MC_DROPOUT_STREAM) keys the MC-dropout passes: a constant far from the
# counters (0..3) that `jax.random.split` uses for the noise and dropout keys, so the streams
# stay independent and the keys of every other step input stay what they were.
_MC_DROPOUT_STREAM = 0x6D634450


def mc_dropout_mean_probs(
    state: TrainState,
    images: jax.Array,
    rng: jax.Array,
    num_passes: int,
    example_ids: jax.Array,
    label_mode: str,
) -> jax.Array:
    """Mean class probabilities of `num_passes` dropout forward passes, without gradient.

    BatchNorm normalises with the batch statistics, as in the training pass the weights are
    applied to, and the statistics these passes compute are discarded: they never reach the
    state. Each pass's masks come from `fold_in(rng, pass)` and the examples' global indices,
    so they do not depend on the device layout.

    Args:
      state: the current train state (params, batch_stats, apply_fn).
      images: this device's images [B, H, W, C].
      rng: key of the passes (the same on every device).
      num_passes: P, the number of passes.
      example_ids: [B] indices of the examples in the global batch.
      label_mode: 'softmax' or 'sigmoid'.

    Returns:
      [B, H, W, K] float32 mean probabilities.
    """
    variables = {"params": state.params, "batch_stats": state.batch_stats}

    def one(p):
        outputs, _ = state.apply_fn(
            variables,
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.fold_in(rng, p)},
            example_ids=example_ids,
        )
        return losses.probabilities(outputs["logits"], label_mode)

    probs = jax.vmap(one)(jnp.arange(num_passes))
    return jax.lax.stop_gradient(jnp.mean(probs, axis=0))


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    label_mode: str,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on this device's share of the global batch.

    Non-finite loss or gradients leave the state unchanged (the host then raises or counts a
    skip, per `config.nan_policy`).
    """
    step_rng = jax.random.fold_in(rng, state.step)
    noise_rng, dropout_rng = jax.random.split(step_rng)
    local_batch = batch["image"].shape[0]
    ids = parallel.example_ids(local_batch)
    # Dropout masks must not depend on the device layout either: each example's mask is drawn
    # from its global index (models.example_dropout).
    extra_outputs = {}
    lc = config.loss
    if config.method in losses.UNCERTAINTY_HEAD_METHODS and lc.uncertainty_source == "mc_dropout":
        mc_rng = jax.random.fold_in(step_rng, _MC_DROPOUT_STREAM)
        extra_outputs["mc_probs"] = mc_dropout_mean_probs(
            state, batch["image"], mc_rng, lc.mc_passes, ids, label_mode
        )

    def loss_fn(params):
        outputs, new_vars = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_rng},
            example_ids=ids,
        )
        outputs = dict(outputs, **extra_outputs)
        loss, aux = losses.compute_loss(
            config,
            outputs,
            batch["mask"],
            noise_rng,
            state.step,
            label_mode,
            ids,
            axis_name=parallel.AXIS,
        )
        return loss, (aux, new_vars.get("batch_stats", {}))

    (loss, (aux, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, parallel.AXIS)
    grad_norm = optax.tree.norm(grads)
    finite_loss = jnp.isfinite(loss)
    finite_grads = jnp.isfinite(grad_norm)
    new_state = state.apply_gradients(grads=grads, batch_stats=new_stats)
    ok = finite_loss & finite_grads
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    # The step counter advances either way, so a skipped step does not replay its data.
    new_state = new_state.replace(step=state.step + 1)
    metrics = dict(aux, grad_norm=grad_norm, finite_loss=finite_loss, finite_grads=finite_grads)
    return new_state, metrics


def eval_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    label_mode: str,
) -> dict[str, jax.Array]:
    """Probabilities from mu (BatchNorm in inference mode) and the uncertainty map."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    outputs = state.apply_fn(variables, batch["image"], train=False)
    probs = losses.probabilities(outputs["logits"], label_mode)
    ids = parallel.example_ids(batch["image"].shape[0])
    if config.eval.uncertainty == "mc_dropout":

        def one(t):
            # Masks per example from its global index: independent of the device layout.
            out = state.apply_fn(
                variables,
                batch["image"],
                train=False,
                mc_dropout=True,
                rngs={"dropout": jax.random.fold_in(rng, t)},
                example_ids=ids,
            )
            return losses.probabilities(out["logits"], label_mode)

        mean = jnp.mean(jax.vmap(one)(jnp.arange(config.eval.num_samples)), axis=0)
        unc = losses.normalized_entropy(mean, label_mode)
    elif "log_var" in outputs:
        z = losses.sample_logits(
            outputs["logits"], outputs["log_var"], rng, config.eval.num_samples, ids
        )
        unc = losses.normalized_entropy(losses.sample_mean_probs(z, label_mode), label_mode)
    else:
        unc = losses.normalized_entropy(probs, label_mode)
    return {"probs": probs, "uncertainty": unc}


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


def _config_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def check_resume_config(saved: dict, current: dict, allow_change: bool) -> list[str]:
    """Compares the config a checkpoint was written with to this run's.

    Args:
      saved: the checkpoint's config (JSON).
      current: this run's config (JSON).
      allow_change: `config.allow_config_change`: resume anyway (the changes are printed).

    Returns:
      Every differing field, incidental ones included (`config_diff.INCIDENTAL_FIELDS`).

    Raises:
      ValueError: a field that changes the computation differs and `allow_change` is False:
        resuming would silently mix two experiments in one workdir.
    """
    # A checkpoint written before a field existed computed what its default computes.
    saved, _ = config_diff.with_defaults(saved)
    changes = config_diff.changed_fields(saved, current)
    computational = config_diff.computational_changes(saved, current)
    if computational and not allow_change:
        raise ValueError(
            "The workdir holds a checkpoint written with another config; resuming would mix two "
            "experiments. Fields that change the computation:\n  "
            + "\n  ".join(computational)
            + "\nUse a new workdir, or pass --config.allow_config_change=True if this is "
            "intended."
        )
    return changes


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


def _check_finite(pending: list, nan_policy: str, counters: dict) -> None:
    """Host check of the in-step finiteness flags of the steps since the last check."""
    for step, m in pending:
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
    pending.clear()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains on the source domains, then evaluates every evaluator in `config.evals`.

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
    ckpts = checkpointing.Checkpoints(workdir, config.keep_checkpoints)
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
            json.dump(_config_json(config), f, indent=2)
        data_dir = prepare.prepare_all(config, info)
    parallel.sync("prepare")
    data_dir = prepare.resolve_data_dir(config)

    model = create_model(config, info)
    rng = jax.random.key(config.seed)
    init_rng, train_rng, eval_rng = jax.random.split(rng, 3)
    host_state = create_train_state(config, info, model, init_rng)
    writer = evaluation.make_writer(workdir)
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
        src = checkpointing.restore_params_from(config.init_from, host_state, replicated)
        host_state = host_state.replace(params=src.params, batch_stats=src.batch_stats)
        print(f"[train] initialised params from {config.init_from}", flush=True)
    start_step = int(host_state.step)

    # ---- data -------------------------------------------------------------------------------
    train_ds = input_pipeline.train_dataset(
        info, config, data_dir, jax.process_index(), jax.process_count()
    )
    train_iter = input_pipeline.make_train_iterator(train_ds, config)
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
        return evaluation.evaluate_domains(
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
    pending: list = []
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
                pending = _fetch(pending)
                last = pending[-1][1]
                _check_finite(pending, config.nan_policy, counters)
                now = time.time()
                scalars = {f"train/{k}": v for k, v in last.items() if not k.startswith("finite")}
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
                    f"loss {float(last['loss']):.4f}, elapsed {_duration(now - t_start)}{speed}"
                )

            t_pause = time.time()
            # Every process takes the same decision at the same step (a collective when several).
            stop = parallel.any_across_processes(preemption.requested)
            if stop or step % config.checkpoint_every_steps == 0 or step == num_steps:
                pending = _fetch(pending)
                # Before saving: a checkpoint is only written after finite steps.
                _check_finite(pending, config.nan_policy, counters)
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
                val_dice = evaluation.mean_dice(results)
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
    evaluation.write_summary(workdir, summary)
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
    results = evaluation.evaluate_domains(
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
    return evaluation.make_summary(config, info, results, evals, selected, step)


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
    ckpts = checkpointing.Checkpoints(workdir, config.keep_checkpoints)
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
    writer = evaluation.make_writer(workdir)
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
    evaluation.write_summary(workdir, summary)
    writer.close()
    ckpts.close()
    return summary
