"""Checkpoints under `<workdir>/checkpoints`: `last/` keeps the last N, `best/` the best on
source validation. Each holds the train state, the data-iterator state and host counters
('extra'), and the config. Orbax writes to a temporary folder and renames it when complete, so a
save killed half way is never listed as a step, and its leftovers are deleted when the workdir
is opened again (tests/test_resume.py checks it). With several processes every process calls
save and restore; orbax writes each array once and the JSON items from process 0.

Arrays are stored without their device layout: a checkpoint written on 8 devices restores on 1
and the other way round (the reader says where the arrays go).
"""

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def _abstract(tree: Any, sharding) -> Any:
    # np.shape / result_type also take the Python int step of a freshly created TrainState.
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x), sharding=sharding),
        tree,
    )


def _item_handlers() -> dict:
    return {
        "state": ocp.StandardCheckpointHandler(),
        "extra": ocp.JsonCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
    }


class Checkpoints:
    """The two checkpoint managers of a workdir.

    Args:
      workdir: the run's workdir; checkpoints go to `<workdir>/checkpoints/{last,best}`.
      keep: how many of the latest checkpoints `last/` keeps.
    """

    def __init__(self, workdir: str, keep: int = 2):
        root = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.last = ocp.CheckpointManager(
            os.path.join(root, "last"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True
            ),
            item_handlers=_item_handlers(),
        )
        self.best = ocp.CheckpointManager(
            os.path.join(root, "best"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                create=True,
                cleanup_tmp_directories=True,
                best_fn=lambda m: m["source_val_dice"],
                best_mode="max",
            ),
            item_handlers=_item_handlers(),
        )

    @staticmethod
    def _args(state, extra, config):
        return ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            extra=ocp.args.JsonSave(extra),
            config=ocp.args.JsonSave(config),
        )

    def save(self, step: int, state: Any, extra: dict, config: dict) -> None:
        """Saves to `last/` (blocking: a preempted job must not exit before it is on disk).

        Args:
          step: the number of steps taken.
          state: the train state (replicated arrays, from every process).
          extra: JSON: {'data_state': the iterator's state, 'counters': {...}}.
          config: the config as JSON.
        """
        self.last.save(step, args=self._args(state, extra, config), force=True)
        self.last.wait_until_finished()

    def save_best(self, step: int, state: Any, extra: dict, config: dict, metric: float) -> bool:
        """Saves to `best/` if `metric` (source-validation Dice) beats the kept one.

        Returns:
          Whether it was saved.
        """
        saved = self.best.save(
            step,
            args=self._args(state, extra, config),
            metrics={"source_val_dice": metric},
            force=True,
        )
        self.best.wait_until_finished()
        return bool(saved)

    def latest_step(self, which: str = "last") -> int | None:
        """The latest step of `last/`, or the best one of `best/`; None when empty."""
        return getattr(self, which).latest_step() if which == "last" else self.best.best_step()

    def restore(self, step: int, like: Any, sharding, which: str = "last") -> tuple[Any, dict]:
        """Restores the state and the extra dict of a step.

        Args:
          step: the step.
          like: a state of the same structure (arrays or ShapeDtypeStructs).
          sharding: where the restored arrays go (any device count).
          which: 'last' or 'best'.

        Returns:
          (state, extra).
        """
        mngr = getattr(self, which)
        out = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(like, sharding)),
                extra=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], out["extra"]

    def restore_json(self, step: int, item: str = "config", which: str = "last") -> dict:
        """A JSON item of a checkpoint: 'config' (what it was written with) or 'extra'."""
        mngr = getattr(self, which)
        return mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]

    def close(self) -> None:
        """Waits for pending saves and releases the managers."""
        self.last.close()
        self.best.close()


def load_state(
    workdir: str, step: int | None = None, which: str = "last", sharding=None
) -> tuple[int, dict]:
    """Reads a checkpointed state without building a model: for inspection, tests and evaluation
    on another device count.

    Args:
      workdir: the run's workdir.
      step: the step; None = the latest of `last/` (the best of `best/`).
      which: 'last' or 'best'.
      sharding: where the arrays go; None = replicated on this process's first device.

    Returns:
      (step, state as nested dicts {'params', 'batch_stats', 'opt_state', 'step'} of arrays).
    """
    directory = os.path.join(os.path.abspath(workdir), "checkpoints", which)
    mngr = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(create=False),
        item_handlers=_item_handlers(),
    )
    try:
        if step is None:
            step = mngr.latest_step() if which == "last" else mngr.best_step()
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {directory}")
        if sharding is None:
            sharding = NamedSharding(Mesh(np.asarray(jax.local_devices()[:1]), ("data",)), P())
        meta = mngr.item_metadata(step)["state"]
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta
        )
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return step, out["state"]
    finally:
        mngr.close()


def restore_params_from(path: str, like: Any, sharding) -> Any:
    """`config.init_from`: another run's latest state (the caller keeps params and batch stats).

    Args:
      path: the other run's workdir.
      like: a state of the same structure.
      sharding: where the restored arrays go.

    Returns:
      The restored state.
    """
    mngr = ocp.CheckpointManager(os.path.join(path, "checkpoints", "last"))
    step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(f"config.init_from={path!r} holds no checkpoint")
    out = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(like, sharding)))
    )
    mngr.close()
    return out["state"]
