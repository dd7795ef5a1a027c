"""How strong was the highlighting: the share of the loss gradient on the most uncertain pixels
and where those pixels lie, measured on a training batch (docs/method.md, "The oracle, the onset
and the diagnostics").

A separately compiled function of (state, batch, rng), run by the trainer every
`loss.diagnostics_every_steps` steps just before the train step it measures, on the same batch
and with the same keys: it never enters the train step, whose cost and numbers stay as they are.
It runs under the train step's device layout ('jit' or 'pmap', see `wrap_diagnostics_step`),
every reduction a global-batch sum.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from puseg_jax import parallel
from puseg_jax.model import boundary_band, losses
from puseg_jax.train import steps

# The top share of U whose gradient share is measured, per image.
TOP_FRACTION = 0.1
# The metric keys, written as train/<key> to metrics.jsonl and TensorBoard.
KEYS = ("grad_share_top10u", "grad_share_band", "top10u_band_overlap", "band_fraction")


def highlight_statistics(
    grad_logits: jax.Array,
    u: jax.Array,
    band: jax.Array,
    axis_name: str | None = None,
    top_fraction: float = TOP_FRACTION,
) -> dict[str, jax.Array]:
    """The diagnostics from the loss gradient, the uncertainty map and the boundary band.

    With g_i = sum_c |dL/dmu_ic| and T the `top_fraction` most uncertain pixels of each image
    (`losses.top_q_selection`), over the global batch:

      grad_share_top10u   = sum_{i in T} g_i / sum_i g_i
      grad_share_band     = sum_{i in band} g_i / sum_i g_i
      top10u_band_overlap = |T and band| / |T|
      band_fraction       = |band| / N

    Args:
      grad_logits: dL/dmu [B, H, W, K] (any common scale: the shares are ratios).
      u: uncertainty [B, H, W].
      band: [B, H, W] in {0, 1} from `boundary_band.boundary_band`.
      axis_name: data-parallel axis to sum over, or None on one device.
      top_fraction: share of each image's pixels in T.

    Returns:
      The four scalars above, by name (`KEYS`); a share is 0 where the gradient is 0.
    """

    def gsum(x):
        s = jnp.sum(x)
        return jax.lax.psum(s, axis_name) if axis_name else s

    g = jnp.sum(jnp.abs(grad_logits.astype(jnp.float32)), axis=-1)
    top = losses.top_q_selection(u, top_fraction)
    total = gsum(g)
    safe = jnp.where(total > 0, total, 1.0)
    return {
        "grad_share_top10u": gsum(top * g) / safe,
        "grad_share_band": gsum(band * g) / safe,
        "top10u_band_overlap": gsum(top * band) / gsum(top),
        "band_fraction": gsum(band) / gsum(jnp.ones_like(band)),
    }


def diagnostics_step(
    state: steps.TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    label_mode: str,
) -> dict[str, jax.Array]:
    """The diagnostics of the train step at `state.step` on this device's share of `batch`.

    The forward pass is the train step's (BatchNorm on the batch, the same dropout masks and
    sampling noise, its statistics discarded); the gradient is that of the step's whole loss
    with respect to the logits mu (the log-variance held fixed). U is the map the method
    weights by (`losses.uncertainty_map`): the sample entropy for `ours` and for the oracle, the
    entropy of softmax/sigmoid(mu) for the methods without a variance head.

    Args:
      state: the train state before the step.
      batch: this device's 'image' and 'mask'.
      rng: the run's training key (the one the train step gets).
      config: the experiment config.
      label_mode: 'softmax' or 'sigmoid'.

    Returns:
      The `highlight_statistics` scalars (the same on every device).
    """
    noise_rng, dropout_rng, ids, extra = steps.step_inputs(
        state, batch, rng, config=config, label_mode=label_mode
    )
    outputs, _ = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats},
        batch["image"],
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": dropout_rng},
        example_ids=ids,
    )
    outputs = dict(outputs, **extra)

    def loss_of_logits(mu):
        loss, _ = losses.compute_loss(
            config,
            dict(outputs, logits=mu),
            batch["mask"],
            noise_rng,
            state.step,
            label_mode,
            ids,
            axis_name=parallel.AXIS,
        )
        return loss

    grad = jax.grad(loss_of_logits)(outputs["logits"])
    u = losses.uncertainty_map(config, outputs, noise_rng, label_mode, ids)
    num_outputs = outputs["logits"].shape[-1]
    band = boundary_band.boundary_band(
        batch["mask"], label_mode, num_outputs, config.loss.oracle_band_px
    )
    return highlight_statistics(grad, u, band, parallel.AXIS)


def wrap_diagnostics_step(
    fn: Callable,
    mesh: Mesh,
    strategy: str,
    compiler_options: dict[str, Any] | None = None,
) -> Callable:
    """Wraps `diagnostics_step` like `parallel.wrap_train_step`, without donating the state.

    Args:
      fn: (state, batch, rng) -> scalars, reducing over `parallel.AXIS`.
      mesh: the device mesh.
      strategy: 'jit' (shard_map) or 'pmap'.
      compiler_options: XLA options of the compiled function ('jit' only).

    Returns:
      (state, batch, rng) -> scalars (one copy), with state and batch laid out as for the
      train step.
    """
    parallel.check_strategy(strategy)
    if strategy == "pmap":
        pmapped = jax.pmap(
            fn, axis_name=parallel.AXIS, in_axes=(0, 0, None), devices=parallel.local_devices(mesh)
        )
        return lambda state, batch, rng: jax.tree.map(lambda x: x[0], pmapped(state, batch, rng))
    # check_vma=False as for the train step (conv_ops 'fast' under a gradient).
    mapped = jax.shard_map(
        fn, mesh=mesh, in_specs=(P(), P(parallel.AXIS), P()), out_specs=P(), check_vma=False
    )
    return jax.jit(mapped, compiler_options=compiler_options)


def due(step: int, calls: int, every: int) -> bool:
    """Whether the call of `calls` train steps after `step` crosses a multiple of `every`.

    The diagnostics of such a call are those of its first step (`step + 1`), the one whose state
    is at hand before the call; with one step per call that is the multiple itself.
    """
    return every > 0 and (step + calls) // every > step // every
