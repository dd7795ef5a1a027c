"""Native against network-grid scoring of a trained workdir: one prediction, scored both ways.

Loads a workdir's config and last checkpoint, predicts every evaluator's split once (as
`--mode=eval` does, with `eval.resolution='native'` so the unresized ground truth is read), then
scores the same predictions with `eval.resolution='network'` (the network's input grid, against
the nearest-resized ground truth: how results were scored before the field existed) and
'native' (probabilities resampled to the released grid, unresized ground truth). Prints, per
evaluator and structure, the mean Dice, HD95, ASD and uncertainty quality at both, with the host
seconds of each scoring (`scoring.score_cases`, `scoring.uncertainty_quality`; the
prediction itself is shared and timed apart).

    python -m benchmarks.bench_resolution --workdir W [--evals Domain3 ...] [--data_dir D]
"""

import argparse
import functools
import time

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from puseg_jax import metrics, parallel
from puseg_jax.data import prepare
from puseg_jax.evaluators import predict, scoring
from puseg_jax.runs.workdir import load_config
from puseg_jax.train import checkpoints, steps
from puseg_jax.train import config as train_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a trained workdir (config.json, ckpt)")
    parser.add_argument("--evals", nargs="*", help="evaluator names (default: all)")
    parser.add_argument("--data_dir", default="", help="TFDS data dir (default: the config's)")
    args = parser.parse_args()

    config = load_config(args.workdir)
    config.eval.resolution = "native"
    if args.data_dir:
        config.data.data_dir = args.data_dir
    info = train_config.validate_config(config)
    mesh = parallel.create_mesh(config.parallel.num_devices)
    strategy = config.parallel.strategy
    init_rng, _, eval_rng = jax.random.split(jax.random.key(config.seed), 3)
    host = steps.create_train_state(config, info, steps.create_model(config, info), init_rng)
    ckpts = checkpoints.Checkpoints(args.workdir, config.keep_checkpoints)
    step = ckpts.latest_step()
    host, _ = ckpts.restore(step, host, NamedSharding(mesh, P()))
    state = parallel.replicate(host, mesh, strategy)
    p_eval_step = parallel.wrap_eval_step(
        functools.partial(steps.eval_step, config=config, label_mode=info.label_mode),
        mesh,
        strategy,
    )
    data_dir = prepare.resolve_data_dir(config)
    evals = train_config.resolve_evals(config)
    print(f"{args.workdir}: {config.method}, step {step}, {jax.device_count()} device(s)")
    print(
        "| evaluator | cases | structure | resolution | Dice | HD95 | ASD | AUROC(U, error) "
        "| U boundary/interior | s per-case metrics | s uncertainty quality |"
    )
    print("|" + "---|" * 11)
    for name in args.evals or list(evals):
        ev = evals[name]
        t0 = time.perf_counter()
        pred = predict.predict_split(
            p_eval_step=p_eval_step, state=state, rng=eval_rng, config=config, info=info,
            data_dir=data_dir, mesh=mesh, strategy=strategy, domain=ev["domain"],
            split=ev["split"],
        )  # fmt: skip
        predict_s = time.perf_counter() - t0
        for resolution in ("network", "native"):
            config.eval.resolution = resolution
            t0 = time.perf_counter()
            rows = scoring.score_cases(pred, info, config, full=True)
            cases_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            unc = scoring.uncertainty_quality(pred, info, config.eval.boundary_width, resolution)
            unc_s = time.perf_counter() - t0
            for s, sm in metrics.summarize_cases(rows).items():
                print(
                    f"| {name} | {len(rows)} | {s} | {resolution} "
                    f"| {sm['dice']['mean']:.4f} | {sm['hd95']['mean']:.2f} "
                    f"| {sm['asd']['mean']:.2f} | {unc['auroc_error']:.3f} "
                    f"| {unc['u_boundary_ratio']:.2f} | {cases_s:.1f} | {unc_s:.1f} |",
                    flush=True,
                )
        print(f"({name}: prediction of {len(pred['case_id'])} examples {predict_s:.1f} s)")
    ckpts.close()


if __name__ == "__main__":
    main()
