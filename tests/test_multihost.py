"""Two processes with two CPU devices each (JAX's gloo CPU collectives on localhost) train like
one process with four devices on the same global batch."""

import json
import os
import time

import numpy as np
import pytest

from tests.conftest import test_config as make_config
from tests.train_worker import SMALL_MODEL, free_port, launch, shared_jax_cache, worker_env

NUM_STEPS = 3
TOLERANCE = 1e-5
TIMEOUT_S = 900


@pytest.fixture
def jax_cache(tmp_path_factory) -> str:
    return shared_jax_cache(tmp_path_factory)


def _losses(workdir: str) -> dict[int, float]:
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [x["step"] for x in lines if "train/loss" in x]
    # One line per step: only process 0 writes.
    assert steps == list(range(1, NUM_STEPS + 1)), steps
    return {x["step"]: x["train/loss"] for x in lines if "train/loss" in x}


def _wait(procs: dict, logs: dict) -> None:
    deadline = time.time() + TIMEOUT_S
    for name, proc in procs.items():
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.time()))
        except Exception:
            for p in procs.values():
                p.kill()
            raise
        assert rc == 0, f"{name} exited with {rc}:\n" + open(logs[name]).read()[-4000:]


def test_two_processes_of_two_devices_match_one_process_of_four(tmp_path, tfds_dir, jax_cache):
    from puseg_jax.core.datasets import get_dataset_info
    from puseg_jax.data import prepare
    from puseg_jax.train import checkpoints

    overrides = {
        "data.data_dir": tfds_dir,
        "num_train_steps": NUM_STEPS,
        "log_every_steps": 1,
        "checkpoint_every_steps": NUM_STEPS,
        "eval_every_steps": 0,
        "evals": {"Domain3": {"domain": "Domain3", "split": "test", "role": "target"}},
        **SMALL_MODEL,
    }
    # Built here once, so that the three processes only read it.
    config = make_config(**overrides)
    prepare.prepare_all(config, get_dataset_info(config.data.name))
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v!r}")]

    multi, single = str(tmp_path / "2x2"), str(tmp_path / "1x4")
    address = f"127.0.0.1:{free_port()}"
    procs, logs = {}, {}
    for pid in range(2):
        name = f"process {pid} of 2"
        logs[name] = str(tmp_path / f"p{pid}.log")
        args = ["tests/train_worker.py", "--workdir", multi, "--devices", "2", *sets]
        args += ["--coordinator", address, "--num-processes", "2", "--process-id", str(pid)]
        procs[name] = launch(args, worker_env(2, jax_cache), logs[name])
    logs["1 process"] = str(tmp_path / "single.log")
    args = ["tests/train_worker.py", "--workdir", single, "--devices", "4", *sets]
    procs["1 process"] = launch(args, worker_env(4, jax_cache), logs["1 process"])
    _wait(procs, logs)

    assert "4 device(s)" in open(logs["process 0 of 2"]).read()
    loss_multi, loss_single = _losses(multi), _losses(single)
    loss_diff = max(abs(loss_multi[s] - loss_single[s]) for s in loss_single)
    step_m, state_m = checkpoints.load_state(multi)
    step_s, state_s = checkpoints.load_state(single)
    assert step_m == step_s == NUM_STEPS
    param_diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(_leaves(state_m["params"]), _leaves(state_s["params"]), strict=True)
    )
    print(f"2x2 vs 1x4: loss {loss_diff:.2e}, params {param_diff:.2e}")
    assert loss_diff <= TOLERANCE
    assert param_diff <= TOLERANCE
    # The evaluation gathers every process's rows: the same scores as on one process.
    sm = json.load(open(os.path.join(multi, "summary.json")))["evals"]["Domain3"]
    ss = json.load(open(os.path.join(single, "summary.json")))["evals"]["Domain3"]
    assert sm["num_examples"] == ss["num_examples"] == 4
    for s in ("OD", "OC"):
        assert abs(sm[s]["dice"] - ss[s]["dice"]) <= 1e-6


def _leaves(tree) -> list:
    import jax

    return jax.tree.leaves(tree)
