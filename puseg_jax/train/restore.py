"""A checkpointed model restored for inference: `restore_for_inference`, the one way to read a
run's weights back for prediction (`--mode=eval`, the final evaluation of the best checkpoint,
`python -m puseg_jax.evaluate`, the notebook)."""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

from puseg_jax import parallel
from puseg_jax.core import compile_cache
from puseg_jax.core.datasets import DatasetInfo
from puseg_jax.model import conv_ops
from puseg_jax.train import checkpoints, steps

CHECKPOINT_FOLDERS = ("last", "best")


@dataclasses.dataclass(frozen=True)
class InferenceModel:
    """A restored model placed for the eval step.

    Attributes:
      state: a `steps.TrainState` with the checkpoint's parameters and BatchNorm statistics and
        no optimizer, in the layout `eval_step` expects (`parallel.replicate`).
      eval_step: the wrapped eval step, (state, {'image'}, rng) -> {'probs', 'uncertainty'};
        compiled on first use.
      step: the checkpoint's step.
      which: its folder, 'last' or 'best'.
    """

    state: Any
    eval_step: Callable
    step: int
    which: str

    @property
    def label(self) -> str:
        """The checkpoint as summary.json names it: 'last' or 'best@<step>'."""
        return "last" if self.which == "last" else f"best@{self.step}"


def restore_for_inference(
    config: ml_collections.ConfigDict,
    info: DatasetInfo,
    workdir: str,
    mesh,
    which: str = "last",
    step: int | None = None,
) -> InferenceModel:
    """Restores a run's checkpoint for prediction on `mesh` (any device count).

    The parameters and BatchNorm statistics are read with the checkpoint's own metadata, so no
    model is initialised and no optimizer built; the eval step is wrapped as the training loop
    wraps it (same compiler options), so it computes what the run's own evaluation computed.

    Args:
      config: the run's config.
      info: its dataset family.
      workdir: the run's workdir.
      mesh: the device mesh.
      which: 'last' or 'best' (the folder under checkpoints/).
      step: the step; None = the latest of last/ (the best of best/).

    Returns:
      The `InferenceModel`.
    """
    if which not in CHECKPOINT_FOLDERS:
        raise ValueError(f"which must be one of {CHECKPOINT_FOLDERS}, got {which!r}")
    strategy = config.parallel.strategy
    compile_cache.use_compile_cache(config.get("compile_cache_dir", ""))
    step, raw = checkpoints.load_state(workdir, step, which)
    model = steps.create_model(config, info)
    tx = optax.identity()
    state = steps.TrainState(
        step=raw["step"],
        apply_fn=model.apply,
        params=raw["params"],
        tx=tx,
        opt_state=tx.init(raw["params"]),
        batch_stats=raw.get("batch_stats", {}),
    )
    state = parallel.replicate(jax.device_get(state), mesh, strategy)
    eval_step = parallel.wrap_eval_step(
        functools.partial(steps.eval_step, config=config, label_mode=info.label_mode),
        mesh,
        strategy,
        compiler_options=conv_ops.compiler_options(config.model.conv_impl),
    )
    return InferenceModel(state=state, eval_step=eval_step, step=int(step), which=which)
