"""The NaN/Inf guard on a real training process: a batch of NaN images at step 5 stops the run
naming the step and the quantity, with the last good checkpoint kept; with nan_policy='skip' the
step is skipped, counted, and the run finishes. (The in-step part, a non-finite step leaving the
state untouched on every device layout, is checked in tests/test_parallel.py.)"""

import json
import os

import numpy as np
import pytest

from tests.train_worker import RUN_STEPS, SMALL_MODEL, launch, shared_jax_cache, worker_env

NAN_STEP = 5
TIMEOUT_S = 600


@pytest.fixture
def jax_cache(tmp_path_factory) -> str:
    return shared_jax_cache(tmp_path_factory)


def _train_with_nan(
    tmp_path, tfds_dir: str, jax_cache: str, nan_policy: str, checkpoint_every: int
):
    workdir, log = str(tmp_path / "w"), str(tmp_path / "train.log")
    overrides = {
        "data.data_dir": tfds_dir,
        "num_train_steps": RUN_STEPS,
        "nan_policy": nan_policy,
        "log_every_steps": 8,
        "checkpoint_every_steps": checkpoint_every,
        "eval_every_steps": 0,
        **SMALL_MODEL,
    }
    args = ["tests/train_worker.py", "--workdir", workdir, "--devices", "8"]
    args += [a for k, v in overrides.items() for a in ("--set", f"{k}={v!r}")]
    args += ["--nan-at-step", str(NAN_STEP)]
    proc = launch(args, worker_env(8, jax_cache), log)
    rc = proc.wait(timeout=TIMEOUT_S)
    return workdir, rc, open(log).read()


def _all_finite(tree) -> bool:
    import jax

    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


def test_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, tfds_dir, jax_cache
):
    from puseg_jax.train import checkpoints

    # Checked at step 6 (a checkpoint step, not a log step), after the bad step 5.
    workdir, rc, log = _train_with_nan(tmp_path, tfds_dir, jax_cache, "raise", checkpoint_every=2)
    assert rc != 0, log[-3000:]
    assert f"FloatingPointError: Non-finite loss at step {NAN_STEP}" in log, log[-3000:]
    # Step 4 is the last checkpoint; step 6, after the bad step, was not written.
    step, state = checkpoints.load_state(workdir)
    assert step == NAN_STEP - 1
    assert int(state["step"]) == NAN_STEP - 1 and _all_finite(state)
    assert not os.path.exists(os.path.join(workdir, "summary.json"))


def test_nan_policy_skip_counts_the_step_and_finishes(tmp_path, tfds_dir, jax_cache):
    from puseg_jax.train import checkpoints

    workdir, rc, log = _train_with_nan(tmp_path, tfds_dir, jax_cache, "skip", checkpoint_every=8)
    assert rc == 0, log[-3000:]
    assert f"Non-finite loss at step {NAN_STEP}: step skipped (1 so far)" in log
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["skipped_steps"] == 1
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [x["train/skipped_steps"] for x in lines if "train/skipped_steps" in x][-1] == 1
    # The skipped step is left out of its log window's means (steps 1-8), not averaged in.
    assert all(np.isfinite(x["train/loss"]) for x in lines if "train/loss" in x)
    step, state = checkpoints.load_state(workdir)
    assert step == RUN_STEPS and _all_finite(state)
