"""Checkpoints across device counts, a save killed half way, and exact resume after SIGTERM of a
real training process (`python -m puseg_jax.main`)."""

import json
import os
import signal
import subprocess
import textwrap
import time

import numpy as np
import pytest

from tests.train_worker import RUN_STEPS, SMALL_MODEL, launch, shared_jax_cache, worker_env

TIMEOUT_S = 600


@pytest.fixture
def jax_cache(tmp_path_factory) -> str:
    return shared_jax_cache(tmp_path_factory)


def _leaves(tree) -> list:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _device_counts(tree) -> set[int]:
    import jax

    return {len(x.sharding.device_set) for x in jax.tree.leaves(tree)}


def _replicated(num_devices: int):
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    return NamedSharding(Mesh(np.asarray(jax.devices()[:num_devices]), ("data",)), P())


def test_checkpoint_moves_between_8_devices_and_1(tiny_workdir, tmp_path):
    from puseg_jax.train import checkpoints

    # Written by the 8-device session run; read onto 1 device and onto 8.
    step, on1 = checkpoints.load_state(tiny_workdir, sharding=_replicated(1))
    _, on8 = checkpoints.load_state(tiny_workdir, sharding=_replicated(8))
    assert step == 4 and int(on1["step"]) == 4
    assert _device_counts(on1) == {1} and _device_counts(on8) == {8}
    for a, b in zip(_leaves(on1), _leaves(on8), strict=True):
        np.testing.assert_array_equal(a, b)

    # Written from 1 device, restored onto 8 through the manager the training loop uses.
    ckpts = checkpoints.Checkpoints(str(tmp_path))
    ckpts.save(step, on1, {"data_state": {"next_index": step}, "counters": {}}, {"seed": 0})
    restored, extra = ckpts.restore(step, on1, _replicated(8))
    ckpts.close()
    assert extra["data_state"] == {"next_index": step}
    assert _device_counts(restored) == {8}
    for a, b in zip(_leaves(restored), _leaves(on1), strict=True):
        np.testing.assert_array_equal(a, b)


# A process that saves step 1, then dies (SIGKILL from the test) while committing step 2: all
# of step 2's data is written to its temporary folder, the rename that publishes it is not done.
_KILLED_SAVE = textwrap.dedent(
    """
    import asyncio, sys
    import numpy as np
    from orbax.checkpoint._src.path import atomicity
    from puseg_jax.train import checkpoints

    ckpts = checkpoints.Checkpoints(sys.argv[1])
    extra = {"data_state": {"next_index": 1}, "counters": {}}
    ckpts.save(1, {"w": np.arange(1000, dtype=np.float32)}, extra, {"seed": 0})
    print("SAVED 1", flush=True)

    async def finalize_forever(self):
        print("COMMITTING 2", flush=True)
        while True:
            await asyncio.sleep(1)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize_forever
    ckpts.save(2, {"w": np.full(1000, 2.0, np.float32)}, extra, {"seed": 0})
    """
)


def _wait_for_line(log_path: str, text: str, proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        content = open(log_path).read()
        for line in content.splitlines():
            if text in line:
                return line
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}):\n{content[-4000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no {text!r} within {timeout} s:\n{open(log_path).read()[-4000:]}")


def test_save_killed_while_committing_is_ignored_on_restart(tmp_path):
    from puseg_jax.train import checkpoints

    workdir, log = str(tmp_path / "w"), str(tmp_path / "save.log")
    proc = launch(["-c", _KILLED_SAVE, workdir], worker_env(1), log)
    _wait_for_line(log, "COMMITTING 2", proc, TIMEOUT_S)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    last = tmp_path / "w" / "checkpoints" / "last"
    assert any("tmp" in p.name for p in last.iterdir()), "the killed save left no temporary dir"

    ckpts = checkpoints.Checkpoints(workdir)
    assert ckpts.latest_step() == 1
    like = {"w": np.zeros(1000, np.float32)}
    state, extra = ckpts.restore(1, like, _replicated(1))
    np.testing.assert_array_equal(state["w"], np.arange(1000, dtype=np.float32))
    # The step can be written again.
    ckpts.save(2, {"w": np.full(1000, 3.0, np.float32)}, extra, {"seed": 0})
    assert ckpts.latest_step() == 2
    np.testing.assert_array_equal(ckpts.restore(2, like, _replicated(1))[0]["w"], 3.0)
    ckpts.close()
    # Opening the workdir cleared the unfinished save's leftovers (in the background).
    assert sorted(p.name for p in last.iterdir()) == ["1", "2"]


# ---------------------------------------------------------------------------------------------


def _train_command(workdir: str, tfds_dir: str) -> list[str]:
    return [
        "-m",
        "puseg_jax.main",
        "--config",
        "configs/test.py",
        "--workdir",
        workdir,
        f"--config.data.data_dir={tfds_dir}",
        f"--config.num_train_steps={RUN_STEPS}",
        "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=8",
        "--config.eval_every_steps=0",
        *[f"--config.{k}={v!r}" for k, v in SMALL_MODEL.items()],
    ]


def _run_to_end(workdir: str, tfds_dir: str, env: dict, log: str) -> str:
    proc = launch(_train_command(workdir, tfds_dir), env, log)
    rc = proc.wait(timeout=TIMEOUT_S)
    content = open(log).read()
    assert rc == 0, content[-4000:]
    return content


def _losses(workdir: str) -> dict[int, float]:
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return {x["step"]: x["train/loss"] for x in lines if "train/loss" in x}


def test_sigterm_checkpoints_and_rerun_matches_uninterrupted_run(tmp_path, tfds_dir, jax_cache):
    from puseg_jax.train import checkpoints

    env = worker_env(8, jax_cache)
    reference, resumed = str(tmp_path / "reference"), str(tmp_path / "resumed")
    _run_to_end(reference, tfds_dir, env, str(tmp_path / "reference.log"))

    # Preempt: SIGTERM once training has started.
    log = str(tmp_path / "preempted.log")
    proc = launch(_train_command(resumed, tfds_dir), env, log)
    _wait_for_line(log, f"[train] step 1/{RUN_STEPS}", proc, TIMEOUT_S)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=TIMEOUT_S) == 0, open(log).read()[-4000:]
    line = _wait_for_line(log, "[train] preempted: checkpoint at step", proc, 1)
    stopped = int(line.split("step ")[1].split()[0])
    assert 1 <= stopped < RUN_STEPS
    ckpts = checkpoints.Checkpoints(resumed)
    assert ckpts.latest_step() == stopped
    ckpts.close()
    assert not os.path.exists(os.path.join(resumed, "summary.json"))

    # The same command again finishes the job.
    content = _run_to_end(resumed, tfds_dir, env, str(tmp_path / "rerun.log"))
    assert f"resumed from {resumed} at step {stopped}" in content
    assert os.path.isfile(os.path.join(resumed, "summary.json"))

    # Same batches and keys: the same loss at every step, the same final state, bit for bit.
    assert _losses(resumed) == _losses(reference)
    assert sorted(_losses(reference)) == list(range(1, RUN_STEPS + 1))
    step_a, state_a = checkpoints.load_state(reference)
    step_b, state_b = checkpoints.load_state(resumed)
    assert step_a == step_b == RUN_STEPS
    diff = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(_leaves(state_a), _leaves(state_b), strict=True)
    )
    print(f"stopped at step {stopped}/{RUN_STEPS}; resumed vs uninterrupted max |diff| {diff}")
    for a, b in zip(_leaves(state_a), _leaves(state_b), strict=True):
        np.testing.assert_array_equal(a, b)
    extras = []
    for w in (reference, resumed):
        ckpts = checkpoints.Checkpoints(w)
        extras.append(ckpts.restore_json(RUN_STEPS, "extra"))
        ckpts.close()
    assert extras[0] == extras[1]
    assert extras[0]["data_state"]["next_index"] == RUN_STEPS
