"""Throughput of the training input pipeline (images/s) against what the train step consumes.

Two settings:
  * demo: configs/demo.py (synthetic fundus stored at 128x128, 64x64 inputs, batch 16, its
    U-Net widths 8-128);
  * fundus256: configs/fundus.py:Domain1 (the DoFE ROIs of ../shared/data/fundus, stored at
    512x512, 256x256 inputs, batch 8, widths 32-512); synthetic fundus stored at 512x512 when
    the real data is not beside the checkout.

For each setting it measures
  1. the per-example cost in one thread (random access, no prefetch): during the first epoch
     (records decoded and resized, then kept in memory) and after;
  2. the iterator the training loop uses, for each number of threads and worker processes
     asked for, after two epochs per process (worker start-up and first decodes not timed);
  3. the train step on one CPU device (compiled, then timed), in images/s;
  4. the ratio pipeline / train step, which must be >= 10: in wall-clock images/s (best
     iterator against the step), and in CPU time per image (the step's CPU ms per image over
     the pipeline's, one thread), which a shared, loaded machine distorts less.

The machine is shared: the load average is printed with the numbers.

    python -m benchmarks.bench_input_pipeline [--settings demo,fundus256] [--batches 30]
        [--threads 1,2,4] [--workers 0,1,2] [--train_steps 3] [--data_dir DIR]
"""

import argparse
import functools
import os
import time
from pathlib import Path

from configs import demo, fundus
from puseg_jax import parallel
from puseg_jax.core.datasets import get_dataset_info
from puseg_jax.data import pipeline, prepare, sources
from puseg_jax.train import steps as train_steps

SHARED_FUNDUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fundus"


def make_config(setting: str, data_dir: str):
    """The config of a setting and a line describing its data."""
    if setting == "demo":
        config = demo.get_config()
        what = "synth_fundus stored 128x128"
    elif setting == "fundus256":
        config = fundus.get_config("Domain1")
        if SHARED_FUNDUS.is_dir():
            config.data.manual_dir = str(SHARED_FUNDUS)
            what = "DoFE fundus ROIs stored 512x512 (Domain2-4 train)"
        else:
            config.data.name = "synth_fundus"
            config.data.builder_config = {"num_train": 64, "num_test": 4, "size": 512}
            config.evals = {}
            what = "synth_fundus stored 512x512 (real data not found)"
    else:
        raise ValueError(f"Unknown setting {setting!r}")
    config.data.data_dir = data_dir
    return config, what


def epoch_batches(config, info, data_dir: str) -> int:
    """Batches in which the stream visits about every training record once."""
    records = sum(
        len(sources.make_reader(info, config, d, config.data.train_split, data_dir))
        for d in config.data.source_domains
    )
    return -(-records // config.batch_size)


def per_example_cost(ds, start: int, num_batches: int, batch: int) -> tuple[float, float]:
    """(images/s, CPU ms/image) of random access to batches start.. in this thread."""
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(start, start + num_batches):
        ds[i]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return num_batches * batch / wall, 1e3 * cpu / (num_batches * batch)


def iterator_rate(ds, config, threads: int, warmup: int, num_batches: int, batch: int) -> float:
    """Images/s of the training iterator after `warmup` batches (worker start-up, and each
    process's first decode of the records)."""
    it = pipeline.make_train_iterator(ds, config, num_threads=threads)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    rate = num_batches * batch / (time.perf_counter() - t0)
    del it  # stops workers
    return rate


def train_step_rate(config, info, ds, steps: int) -> tuple[float, float, float]:
    """(compile seconds, images/s, CPU ms/image) of the train step on one CPU device."""
    import jax

    config.parallel.num_devices = 1
    mesh = parallel.create_mesh(1)
    model = train_steps.create_model(config, info)
    state = train_steps.create_train_state(config, info, model, jax.random.key(0))
    state = parallel.replicate(state, mesh, "jit")
    step = parallel.wrap_train_step(
        functools.partial(train_steps.train_step, config=config, label_mode=info.label_mode),
        mesh,
        "jit",
    )
    batch = ds[0]
    batch = parallel.shard_batch({"image": batch["image"], "mask": batch["mask"]}, mesh, "jit")
    rng = jax.random.key(1)
    t0 = time.perf_counter()
    state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    images = steps * config.batch_size
    return compile_s, images / wall, 1e3 * cpu / images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default="demo,fundus256")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per run")
    parser.add_argument("--threads", default="1,2,4", help="thread counts to try")
    parser.add_argument("--workers", default="0,1,2", help="worker process counts to try")
    parser.add_argument("--train_steps", type=int, default=3, help="timed train steps; 0 = skip")
    parser.add_argument("--data_dir", default="/tmp/puseg_bench_tfds")
    args = parser.parse_args()

    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags

    rows = []
    for setting in args.settings.split(","):
        config, what = make_config(setting, args.data_dir)
        info = get_dataset_info(config.data.name)
        prepare.prepare_all(config, info)
        ds = pipeline.train_dataset(info, config, args.data_dir)
        batch = config.batch_size
        size = config.data.image_size
        print(f"\n== {setting}: {what}; {size}x{size} inputs, batch {batch}", flush=True)
        epoch = epoch_batches(config, info, args.data_dir)
        _, cold_cpu = per_example_cost(ds, 0, epoch, batch)
        single, single_cpu = per_example_cost(ds, epoch, args.batches, batch)
        print(
            f"one thread, random access: first epoch {cold_cpu:.2f} CPU ms/image (decode and "
            f"resize), then {single_cpu:.2f} CPU ms/image, {single:.1f} images/s",
            flush=True,
        )
        best = (0.0, "")
        for workers in [int(w) for w in args.workers.split(",")]:
            for threads in [int(t) for t in args.threads.split(",")]:
                config.data.num_workers = workers
                warmup = 2 * epoch * max(workers, 1)
                rate = iterator_rate(ds, config, threads, warmup, args.batches, batch)
                label = f"{workers} workers x {threads} threads"
                print(f"iterator, {label}: {rate:.1f} images/s", flush=True)
                best = max(best, (rate, label))
        step_rate = step_cpu = float("nan")
        if args.train_steps:
            compile_s, step_rate, step_cpu = train_step_rate(config, info, ds, args.train_steps)
            print(
                f"train step (widths {tuple(config.model.widths)}, 1 CPU device): "
                f"{step_rate:.1f} images/s ({batch / step_rate:.2f} s/step, "
                f"{step_cpu:.1f} CPU ms/image, compile {compile_s:.0f} s)",
                flush=True,
            )
        rows.append((setting, single, single_cpu, best, step_rate, step_cpu))

    load = os.getloadavg()
    print(f"\nload average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs")
    print(
        "| setting | 1 thread img/s (CPU ms/img) | best iterator img/s (config) | "
        "train step img/s (CPU ms/img) | ratio wall | ratio CPU |"
    )
    print("|---|---|---|---|---|---|")
    for setting, single, single_cpu, (rate, label), step_rate, step_cpu in rows:
        print(
            f"| {setting} | {single:.0f} ({single_cpu:.2f}) | {rate:.0f} ({label}) | "
            f"{step_rate:.1f} ({step_cpu:.1f}) | {rate / step_rate:.1f}x | "
            f"{step_cpu / single_cpu:.1f}x |"
        )


if __name__ == "__main__":
    main()
