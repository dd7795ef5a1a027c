"""Prediction of every example of a split on the devices, in the source's order, no padding."""

import jax
import ml_collections
import numpy as np

from puseg_jax import parallel
from puseg_jax.core.datasets import DatasetInfo
from puseg_jax.data import pipeline
from puseg_jax.evaluators.scoring import scoring_resolution

_PRED_KEYS = (
    "image",
    "mask",
    "spacing",
    "spacing_unit",
    "case_id",
    "slice_index",
    "num_slices",
    "index",
    "native_shape",
    "native_spacing",
)

# ---------------------------------------------------------------------------------------------
# Prediction.


def _process_rows(n: int) -> slice:
    """This process's rows of a global batch of n: contiguous blocks in process order, the
    layout `parallel.shard_batch` assembles on the 1-D mesh."""
    local = n // jax.process_count()
    return slice(jax.process_index() * local, (jax.process_index() + 1) * local)


def predict_split(
    p_eval_step,
    state,
    rng: jax.Array,
    config: ml_collections.ConfigDict,
    info: DatasetInfo,
    data_dir: str,
    mesh,
    strategy: str,
    domain: str,
    split: str,
) -> dict[str, np.ndarray]:
    """Predictions for every example of (domain, split), in the source's order, no padding.

    Args:
      p_eval_step: the wrapped eval step, (state, {'image'}, rng) -> {'probs', 'uncertainty'}.
      state: the model state in the layout the step expects.
      rng: key of the evaluation; batch i uses fold_in(rng, i).
      config: the experiment config.
      info: the dataset family.
      data_dir: the TFDS data dir.
      mesh: the device mesh.
      strategy: parallel.strategy.
      domain: the domain.
      split: its split.

    Returns:
      {'image', 'mask', 'spacing' (network grid), 'spacing_unit', 'case_id', 'slice_index',
      'num_slices', 'index', 'native_shape' [N, 2], 'native_spacing' [N, 3] (row, col, slice),
      'probs' [N, H, W, K], 'uncertainty' [N, H, W]} with N the split's size, and with
      `eval.resolution='native'` 'native_mask': an object array of N uint8 class masks, each
      on its example's native grid (sizes may differ between examples).
    """
    native = scoring_resolution(config) == "native"
    keys = _PRED_KEYS + (("native_mask",) if native else ())
    out: dict[str, list] = {k: [] for k in keys + ("probs", "uncertainty")}
    batches = pipeline.eval_batches(
        info, config, domain, split, data_dir, config.eval.batch_size, native_masks=native
    )
    for i, batch in enumerate(batches):
        valid = batch["valid"]
        # The images only: labels never reach the devices.
        local = {"image": batch["image"][_process_rows(len(valid))]}
        device_batch = parallel.shard_batch(local, mesh, strategy)
        pred = parallel.to_host(p_eval_step(state, device_batch, jax.random.fold_in(rng, i)))
        if len(pred["probs"]) != len(valid):
            raise ValueError(f"eval step returned {len(pred['probs'])} rows for {len(valid)}")
        for k in keys:
            out[k].append(batch[k][valid])
        out["probs"].append(np.asarray(pred["probs"])[valid])
        out["uncertainty"].append(np.asarray(pred["uncertainty"])[valid])
    return {k: np.concatenate(v) for k, v in out.items()}
