"""Prediction of every example of a split on the devices, in the source's order, no padding."""

import jax
import ml_collections
import numpy as np

from puseg_jax import parallel
from puseg_jax.core.datasets import DatasetInfo
from puseg_jax.data import pipeline
from puseg_jax.evaluators.records import Predictions
from puseg_jax.evaluators.scoring import scoring_resolution

# The batch's fields each prediction carries, by their `Predictions` names.
_BATCH_FIELDS = {
    "image": "image",
    "mask": "label",
    "spacing": "spacing",
    "spacing_unit": "spacing_unit",
    "case_id": "case_id",
    "slice_index": "slice_index",
    "num_slices": "num_slices",
    "index": "index",
    "native_shape": "native_shape",
    "native_spacing": "native_spacing",
}

# ---------------------------------------------------------------------------------------------
# Prediction.


def _process_rows(n: int) -> slice:
    """This process's rows of a global batch of n: contiguous blocks in process order, the
    layout `parallel.shard_batch` assembles on the 1-D mesh."""
    local = n // jax.process_count()
    return slice(jax.process_index() * local, (jax.process_index() + 1) * local)


def predict_split(
    *,
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
) -> Predictions:
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
      The `Predictions` of the N examples of the split (all fields but `resolution`;
      `native_label` with `eval.resolution='native'`).
    """
    native = scoring_resolution(config) == "native"
    fields = _BATCH_FIELDS | ({"native_mask": "native_label"} if native else {})
    out: dict[str, list] = {k: [] for k in list(fields.values()) + ["probability", "uncertainty"]}
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
        for key, field in fields.items():
            out[field].append(batch[key][valid])
        out["probability"].append(np.asarray(pred["probs"])[valid])
        out["uncertainty"].append(np.asarray(pred["uncertainty"])[valid])
    return Predictions(**{k: np.concatenate(v) for k, v in out.items()})
