"""Train-step cost of each method and highlighting variant, relative to today's `ours`.

The real step (`steps.train_step` through `parallel.wrap_train_step`, one device) of the fundus
CPU budget (`configs/fundus.py:Domain1,cpu`: batch 8, 128x128, widths 16-256) on a fixed random
batch. Every variant is compiled first; then the variants are timed in turn, a few steps each,
round after round, so that all of them see the same machine conditions (this matters on a shared
CPU). Reported: the median seconds per step over the rounds and its ratio to `ours`.

Usage (from the repository root):
  PYTHONPATH=. python benchmarks/bench_variants.py [--rounds 3] [--steps 2] [--only ours erm ...]
"""

import argparse
import functools
import os
import platform
import statistics
import time

import jax
import numpy as np

from configs import fundus
from puseg_jax import parallel
from puseg_jax.train import config as train_config
from puseg_jax.train import steps

# name: (method, config overrides); the variant fields are those of docs/method.md.
VARIANTS = {
    "ours": ("ours", {}),
    "ours_no_highlight": ("ours_no_highlight", {}),
    "erm": ("erm", {}),
    "erm_nll": ("erm_nll", {}),
    "ours ce+unc": ("ours", {"loss.highlight_terms": "ce+unc"}),
    "ours ce+unc+dice": ("ours", {"loss.highlight_terms": "ce+unc+dice"}),
    "ours mean": ("ours", {"loss.highlight_norm": "mean"}),
    "ours sigma": ("ours", {"loss.uncertainty_source": "sigma"}),
    "ours top_q 0.2": ("ours", {"loss.highlight_top_q": 0.2}),
    "ours dropout 0.1 (entropy)": ("ours", {"model.dropout_rate": 0.1}),
    "ours mc_dropout x3": (
        "ours",
        {"loss.uncertainty_source": "mc_dropout", "loss.mc_passes": 3, "model.dropout_rate": 0.1},
    ),
}


def _set(config, key, value):
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value


def build(method, overrides, batch):
    config = fundus.get_config("Domain1,cpu")
    config.method = method
    config.parallel.num_devices = 1
    for k, v in overrides.items():
        _set(config, k, v)
    info = train_config.validate_config(config)
    model = steps.create_model(config, info)
    state = steps.create_train_state(config, info, model, jax.random.key(0))
    mesh = parallel.create_mesh(1)
    step = parallel.wrap_train_step(
        functools.partial(steps.train_step, config=config, label_mode=info.label_mode), mesh, "jit"
    )
    holder = {"state": parallel.replicate(state, mesh, "jit")}
    sharded = parallel.shard_batch(batch, mesh, "jit")
    rng = jax.random.key(1)

    def run(n):
        for _ in range(n):
            holder["state"], m = step(holder["state"], sharded, rng)
        jax.block_until_ready(m["loss"])

    return run


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux) and the number of cores JAX may use."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant and round")
    parser.add_argument("--only", nargs="*", default=None, help="variant names (default: all)")
    args = parser.parse_args()
    names = args.only or list(VARIANTS)
    rs = np.random.default_rng(0)
    batch = {
        "image": rs.standard_normal((8, 128, 128, 3)).astype(np.float32),
        "mask": rs.integers(0, 3, (8, 128, 128)).astype(np.int32),
    }
    runs = {}
    for name in names:
        t = time.perf_counter()
        runs[name] = build(*VARIANTS[name], batch)
        runs[name](1)  # compile and one warm-up step
        print(f"[bench] {name}: compiled + 1 step in {time.perf_counter() - t:.1f} s", flush=True)
    times = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names:
            t = time.perf_counter()
            runs[name](args.steps)
            times[name].append((time.perf_counter() - t) / args.steps)
        print(f"[bench] round {r + 1}/{args.rounds} done", flush=True)
    print(
        f"\n{cpu_name()}, jax {jax.__version__}, "
        f"{jax.devices()[0].platform}, {args.rounds} rounds x {args.steps} steps"
    )
    ref = statistics.median(times["ours"]) if "ours" in times else None
    print("| variant | s/step (median) | min | max | vs ours |")
    print("|---|---|---|---|---|")
    for name in names:
        med = statistics.median(times[name])
        rel = f"{med / ref:.2f}x" if ref else "-"
        print(f"| {name} | {med:.3f} | {min(times[name]):.3f} | {max(times[name]):.3f} | {rel} |")


if __name__ == "__main__":
    main()
