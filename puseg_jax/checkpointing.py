"""Checkpoints under `<workdir>/checkpoints`: `last/` keeps the last N, `best/` the best on
source validation. Each holds the train state, the data-iterator state and host counters, and
the config. Orbax writes to a temporary folder and renames it when complete, so a save killed
half way is never listed as a step (tests/test_resume.py checks it).
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def _abstract(tree: Any, sharding) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class Checkpoints:
    """The two checkpoint managers of a workdir."""

    def __init__(self, workdir: str, keep: int = 2):
        root = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.last = ocp.CheckpointManager(
            os.path.join(root, "last"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )
        self.best = ocp.CheckpointManager(
            os.path.join(root, "best"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, best_fn=lambda m: m["source_val_dice"], best_mode="max"
            ),
        )

    @staticmethod
    def _args(state, extra, config):
        return ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            extra=ocp.args.JsonSave(extra),
            config=ocp.args.JsonSave(config),
        )

    def save(self, step: int, state: Any, extra: dict, config: dict) -> None:
        """Saves to `last/` (blocking: a preempted job must not exit before it is on disk)."""
        self.last.save(step, args=self._args(state, extra, config), force=True)
        self.last.wait_until_finished()

    def save_best(self, step: int, state: Any, extra: dict, config: dict, metric: float) -> bool:
        saved = self.best.save(
            step,
            args=self._args(state, extra, config),
            metrics={"source_val_dice": metric},
            force=True,
        )
        self.best.wait_until_finished()
        return bool(saved)

    def latest_step(self, which: str = "last") -> int | None:
        return getattr(self, which).latest_step() if which == "last" else self.best.best_step()

    def restore(self, step: int, like: Any, sharding, which: str = "last") -> tuple[Any, dict]:
        """Restores state (shaped like `like`, placed with `sharding`, whatever the device count
        it was written with) and the extra dict."""
        mngr = getattr(self, which)
        out = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(like, sharding)),
                extra=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], out["extra"]

    def close(self) -> None:
        self.last.close()
        self.best.close()


def restore_params_from(path: str, like: Any, sharding) -> Any:
    """`config.init_from`: the params and batch stats of another run's latest checkpoint."""
    mngr = ocp.CheckpointManager(os.path.join(path, "checkpoints", "last"))
    step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(f"config.init_from={path!r} holds no checkpoint")
    out = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(like, sharding)))
    )
    mngr.close()
    return out["state"]
