"""The train metrics of a log window: device metrics fetched per step, their finiteness checked
(raise or skip), and their means over the window's applied steps with clu.metrics."""

import functools
from collections.abc import Callable

import jax
import numpy as np
from clu import metrics as clu_metrics


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
