"""A training process for the tests that need real processes (multi-host, NaN guard).

    python tests/train_worker.py --workdir W --devices 2 --set data.data_dir='"/tmp/tfds"' \
        [--coordinator 127.0.0.1:PORT --num-processes 2 --process-id 0] [--nan-at-step 3]

runs `trainer.train_and_evaluate` on configs/test.py with the overrides (values are Python
literals, anything else is a string) on `--devices` fake CPU devices. `--nan-at-step K` turns the
images of step K's batch into NaN, the way a corrupt record would, to exercise the NaN guard
without a debug option in the library. The result summary is printed as the last line, JSON.

The launch helpers below (`shared_jax_cache`, `worker_env`, `launch`) are imported by the tests;
importing this module does not import JAX.
"""

import argparse
import ast
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The child processes test processes, signals and files, not the model: a two-level U-Net at
# 16x16 compiles in about half the time of configs/test.py's.
SMALL_MODEL = {"model.widths": (4, 8), "data.image_size": 16}
# Training steps of the single-process runs of the resume and NaN tests: the same everywhere, so
# that they compile the same programs (shared through `shared_jax_cache`), and enough for a
# SIGTERM sent after step 1 to land well before the end.
RUN_STEPS = 24


def shared_jax_cache(tmp_path_factory) -> str:
    """One persistent compilation cache for all the session's child processes: the runs of
    the resume and NaN tests compile the same programs, and only the first pays."""
    path = tmp_path_factory.getbasetemp() / "jax_cache"
    path.mkdir(exist_ok=True)
    return str(path)


def worker_env(devices: int, cache_dir: str | None = None) -> dict[str, str]:
    """Environment of a child process: `devices` fake CPU devices, the repo importable, and a
    shared persistent compilation cache (the runs of a test compile the same programs)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def launch(args: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen:
    """Starts `python <args>` in the repo root, stdout and stderr to `log_path`."""
    log = open(log_path, "w")
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _inject_nan(step: int) -> None:
    """Makes the training iterator return NaN images for step `step` (1-based)."""
    import numpy as np

    from puseg_jax.data import pipeline

    make = pipeline.make_train_iterator

    class NaNAt:
        def __init__(self, inner):
            self.inner = inner

        def __iter__(self):
            return self

        def __next__(self):
            this_step = self.inner.get_state()["next_index"] + 1
            batch = next(self.inner)
            if this_step == step:
                batch = dict(batch, image=np.full_like(batch["image"], np.nan))
            return batch

        def get_state(self):
            return self.inner.get_state()

        def set_state(self, state):
            self.inner.set_state(state)

    pipeline.make_train_iterator = lambda ds, config: NaNAt(make(ds, config))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--set", action="append", default=[], help="dotted.key=value")
    parser.add_argument("--coordinator", default="")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--nan-at-step", type=int, default=0)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(REPO))

    from puseg_jax.train import trainer
    from tests.conftest import test_config

    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = _parse_value(value)
    if args.coordinator:
        overrides.update(
            {
                "parallel.coordinator_address": args.coordinator,
                "parallel.num_processes": args.num_processes,
                "parallel.process_id": args.process_id,
                "parallel.cpu_collectives": "gloo",
            }
        )
    if args.nan_at_step:
        _inject_nan(args.nan_at_step)
    summary = trainer.train_and_evaluate(test_config(**overrides), args.workdir)
    print(json.dumps(summary, default=str), flush=True)


if __name__ == "__main__":
    main()
