"""Speed of the host side of evaluation, in cases/s: post-processing and per-case metrics, the
uncertainty-quality summary, and the reports written to disk.

Predictions are synthetic but shaped like `predict.predict_split`'s output:
  * fundus: 2-D cases at 256x256 with two nested structures (OD, OC), sigmoid probabilities;
  * prostate: volumes of --slices slices at 256x256, spacing (0.6, 0.6, 3.6) mm, softmax
    probabilities, re-stacked from shuffled slices and scored in 3-D.
Probabilities are a blurred, shifted copy of the ground truth with noise, so that both
directed surface-distance sets and the calibration bins are non-trivial.

With --model, the compiled eval step of configs/fundus.py (widths 32-512, 256x256) is timed
too, in images/s on one CPU device, with the model's compile time reported apart.

    python -m benchmarks.bench_eval [--cases 40] [--volumes 4] [--slices 24] [--repeats 3]
        [--model]
"""

import argparse
import tempfile
import time

import numpy as np
from scipy import ndimage

from configs import fundus
from puseg_jax.core.datasets import get_dataset_info
from puseg_jax.core.logging_utils import MetricWriter
from puseg_jax.evaluators import reports as evaluators_reports
from puseg_jax.evaluators import scoring
from puseg_jax.evaluators.records import Predictions


def _blob(rng: np.random.Generator, shape: tuple[int, ...], radius: float) -> np.ndarray:
    """A smooth random blob of about `radius` pixels in the last two axes."""
    grid = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    centre = [n / 2 + rng.uniform(-n / 10, n / 10) for n in shape]
    scale = [radius] * len(shape)
    if len(shape) == 3:
        scale[0] = shape[0] / 2.5  # slices
    r = np.sqrt(sum(((g - c) / s) ** 2 for g, c, s in zip(grid, centre, scale, strict=True)))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 4)
    return r + 0.3 * noise / (noise.std() + 1e-6) < 1.0


def _probability(rng: np.random.Generator, gt: np.ndarray) -> np.ndarray:
    """A plausible network output for a ground-truth mask (...spatial): blurred, shifted, noisy."""
    shifted = np.roll(gt.astype(np.float32), 3, axis=-1)
    p = ndimage.gaussian_filter(shifted, [0] * (gt.ndim - 2) + [2, 2])
    p = p + 0.1 * rng.standard_normal(gt.shape).astype(np.float32)
    return np.clip(p, 0.0, 1.0)


def fundus_pred(rng: np.random.Generator, cases: int, size: int = 256) -> Predictions:
    """`predict_split`-like output for 2-D fundus cases."""
    masks, probs = [], []
    for _ in range(cases):
        od = _blob(rng, (size, size), size / 5)
        oc = _blob(rng, (size, size), size / 10) & od
        masks.append(od.astype(np.int32) + oc)
        probs.append(np.stack([_probability(rng, od), _probability(rng, oc)], -1))
    probs = np.stack(probs)
    return Predictions(
        **{
            "image": rng.standard_normal((cases, size, size, 3)).astype(np.float32),
            "label": np.stack(masks),
            "probability": probs,
            "uncertainty": 1 - np.abs(2 * probs.max(-1) - 1),
            "spacing": np.tile(np.float32([2.0, 2.0, 1.0]), (cases, 1)),
            "spacing_unit": np.array(["pixel"] * cases),
            "case_id": np.array([f"f{i:03d}" for i in range(cases)]),
            "slice_index": np.zeros(cases, np.int64),
            "num_slices": np.ones(cases, np.int64),
            "index": np.arange(cases),
            "native_shape": np.tile(np.int32([size, size]), (cases, 1)),
            "native_spacing": np.ones((cases, 3), np.float32),
        }
    )


def prostate_pred(
    rng: np.random.Generator, volumes: int, slices: int, size: int = 256
) -> Predictions:
    """`predict_split`-like output for volumes, slices in shuffled order."""
    masks, probs, case_ids, slice_ids = [], [], [], []
    for v in range(volumes):
        gland = _blob(rng, (slices, size, size), size / 6)
        fg = _probability(rng, gland)
        masks.append(gland.astype(np.int32))
        probs.append(np.stack([1 - fg, fg], -1))
        case_ids += [f"p{v:02d}"] * slices
        slice_ids += list(range(slices))
    n = volumes * slices
    order = rng.permutation(n)
    probs = np.concatenate(probs)[order]
    return Predictions(
        **{
            "image": rng.standard_normal((n, size, size, 1)).astype(np.float32),
            "label": np.concatenate(masks)[order],
            "probability": probs,
            "uncertainty": 1 - np.abs(2 * probs[..., 1] - 1),
            "spacing": np.tile(np.float32([0.6, 0.6, 3.6]), (n, 1)),
            "spacing_unit": np.array(["mm"] * n),
            "case_id": np.array(case_ids)[order],
            "slice_index": np.array(slice_ids)[order],
            "num_slices": np.full(n, slices),
            "index": np.arange(n),
            "native_shape": np.tile(np.int32([size, size]), (n, 1)),
            "native_spacing": np.tile(np.float32([0.6, 0.6, 3.6]), (n, 1)),
        }
    )


def best_of(repeats: int, fn) -> float:
    """Shortest wall time of `repeats` calls (the machine is shared)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_host(name: str, pred, info, config, repeats: int) -> None:
    cases = len(scoring.group_cases(pred, info.volumetric))
    full = best_of(repeats, lambda: scoring.score_cases(pred, info, config, full=True))
    dice = best_of(repeats, lambda: scoring.score_cases(pred, info, config, full=False))
    width = config.eval.boundary_width
    unc = best_of(repeats, lambda: scoring.uncertainty_quality(pred, info, width))
    ev = {"role": "target", "domain": name, "split": "test"}
    res, rows = scoring.score_split(pred, info, config, ev, 0)
    with tempfile.TemporaryDirectory() as workdir:
        writer = MetricWriter(workdir)
        reports = best_of(
            1,
            lambda: evaluators_reports.write_domain_reports(
                workdir, name, res, rows, pred, info, config, 0, writer
            ),
        )
        writer.close()
    print(
        f"| {name} | {cases} | {cases / full:.1f} | {cases / dice:.1f} | {cases / unc:.1f} | "
        f"{cases / reports:.1f} |",
        flush=True,
    )


def bench_model(config, info, batches: int) -> None:
    import functools

    import jax

    from puseg_jax import parallel
    from puseg_jax.train import steps

    mesh = parallel.create_mesh(1)
    model = steps.create_model(config, info)
    state = steps.create_train_state(config, info, model, jax.random.key(0))
    state = parallel.replicate(state, mesh, "jit")
    step = parallel.wrap_eval_step(
        functools.partial(steps.eval_step, config=config, label_mode=info.label_mode), mesh, "jit"
    )
    size, b = config.data.image_size, config.eval.batch_size
    batch = parallel.shard_batch({"image": np.zeros((b, size, size, 3), np.float32)}, mesh, "jit")
    key = jax.random.key(0)
    t0 = time.perf_counter()
    jax.block_until_ready(step(state, batch, key))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(batches):
        out = step(state, batch, jax.random.fold_in(key, i))
    jax.block_until_ready(out)
    rate = batches * b / (time.perf_counter() - t0)
    print(
        f"eval step ({config.method}, widths {tuple(config.model.widths)}, {size}x{size}, "
        f"{config.eval.num_samples} samples): {rate:.1f} images/s on 1 CPU device "
        f"(compile {compile_s:.0f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=40, help="2-D fundus cases")
    parser.add_argument("--volumes", type=int, default=4, help="prostate volumes")
    parser.add_argument("--slices", type=int, default=24, help="slices per volume")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", action="store_true", help="time the eval step too")
    parser.add_argument("--model_batches", type=int, default=2)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    config = fundus.get_config("Domain1")
    config.eval.num_panels = 4
    # The synthetic predictions and masks share one grid: scored there.
    config.eval.resolution = "network"
    print("cases/s (best of repeats; reports: summary.json, per_case.csv, predictions.npz, panels)")
    print("| evaluator | cases | full metrics | Dice only | uncertainty quality | reports |")
    print("|---|---|---|---|---|---|")
    bench_host(
        "fundus 256x256",
        fundus_pred(rng, args.cases),
        get_dataset_info("fundus"),
        config,
        args.repeats,
    )
    bench_host(
        f"prostate {args.slices}x256x256",
        prostate_pred(rng, args.volumes, args.slices),
        get_dataset_info("prostate"),
        config,
        args.repeats,
    )
    if args.model:
        bench_model(config, get_dataset_info("fundus"), args.model_batches)


if __name__ == "__main__":
    main()
