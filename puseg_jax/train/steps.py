"""The model, optimiser and train state, and the jitted train and eval steps (MC dropout
included)."""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from puseg_jax import parallel
from puseg_jax.core.datasets import DatasetInfo
from puseg_jax.model import conv_ops, losses, unet


class TrainState(train_state.TrainState):
    batch_stats: Any


# ---------------------------------------------------------------------------------------------
# Model, optimizer, state.


def create_model(config: ml_collections.ConfigDict, info: DatasetInfo) -> unet.UNet:
    return unet.UNet(
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
    config: ml_collections.ConfigDict, info: DatasetInfo, model: unet.UNet, rng: jax.Array
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
    return jax.lax.stop_gradient(losses.mean_over_samples(probs))


def step_inputs(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    label_mode: str,
) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, jax.Array]]:
    """The keys, example indices and extra loss inputs of the train step at `state.step`.

    Shared with `train.diagnostics`, which must see the step's own sampling noise and dropout.

    Returns:
      (noise key, dropout key, [B] global example indices, extra outputs: 'mc_probs' for
      `loss.uncertainty_source='mc_dropout'`, else empty).
    """
    step_rng = jax.random.fold_in(rng, state.step)
    noise_rng, dropout_rng = jax.random.split(step_rng)
    local_batch = batch["image"].shape[0]
    ids = parallel.example_ids(local_batch)
    # Dropout masks must not depend on the device layout either: each example's mask is drawn
    # from its global index (unet.example_dropout).
    extra_outputs = {}
    lc = config.loss
    if config.method in losses.UNCERTAINTY_HEAD_METHODS and lc.uncertainty_source == "mc_dropout":
        mc_rng = jax.random.fold_in(step_rng, _MC_DROPOUT_STREAM)
        extra_outputs["mc_probs"] = mc_dropout_mean_probs(
            state, batch["image"], mc_rng, lc.mc_passes, ids, label_mode
        )
    return noise_rng, dropout_rng, ids, extra_outputs


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
    noise_rng, dropout_rng, ids, extra_outputs = step_inputs(
        state, batch, rng, config=config, label_mode=label_mode
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

        mean = losses.mean_over_samples(jax.vmap(one)(jnp.arange(config.eval.num_samples)))
        unc = losses.normalized_entropy(mean, label_mode)
    elif "log_var" in outputs:
        z = losses.sample_logits(
            outputs["logits"], outputs["log_var"], rng, config.eval.num_samples, ids
        )
        unc = losses.normalized_entropy(losses.sample_mean_probs(z, label_mode), label_mode)
    else:
        unc = losses.normalized_entropy(probs, label_mode)
    return {"probs": probs, "uncertainty": unc}
