"""Where a train step's time goes: the U-Net's forward/backward against the method's own part.

The fundus CPU budget (`configs/fundus.py:Domain1,cpu`: batch 8, 128x128, widths 16-256,
sigmoid OD/OC, T = 10; `--config Domain1` for the paper shape: 256x256, widths 32-512) on one
CPU device and a fixed random batch. Each part is its own jitted
function, compiled first, then all parts are timed in turn, round after round (so a shared
machine's load falls on all of them alike); reported: the median over rounds.

  full step           `steps.train_step` as the trainer compiles it (ours, erm)
  U-Net fwd+bwd       gradient of a fixed linear function of the outputs w.r.t. the parameters
                      (BatchNorm in training mode): the network's share of a step
  loss fwd+bwd        `losses.compute_loss` and its gradient w.r.t. the outputs, for fixed
                      outputs: the method's share (for erm: CE + soft Dice)
  ... sample noise    eps [T, B, H, W, K] (threefry, per example)
  ... nll fwd+bwd     the likelihood term over the samples, gradient w.r.t. mu and s, as the loss
                      computes it (`losses.sampled_nll`) and by autodiff (the code before)
  ... U               the normalised entropy of the sample-mean probabilities (no gradient)
  optimizer           `state.apply_gradients` (Adam) with fixed gradients

  PYTHONPATH=. python benchmarks/profile_step.py [--config Domain1,cpu] [--rounds 5] [--reps 3]
      [--json OUT]
"""

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_variants import cpu_name
from configs import fundus
from puseg_jax import parallel
from puseg_jax.model import conv_ops, losses
from puseg_jax.train import config as train_config
from puseg_jax.train import steps


def _setup(method: str, config_arg: str):
    config = fundus.get_config(config_arg)
    config.method = method
    config.parallel.num_devices = 1
    info = train_config.validate_config(config)
    model = steps.create_model(config, info)
    state = steps.create_train_state(config, info, model, jax.random.key(0))
    return config, info, state


def _on_axis(f, mesh, nargs, options):
    """jit(shard_map(f)) on the one-device mesh, everything replicated: BatchNorm's and the
    loss's reductions over `parallel.AXIS` then resolve as in the trainer; compiled with
    `options` (the CPU plan's, as the trainer compiles the step)."""
    from jax.sharding import PartitionSpec as P

    return jax.jit(
        jax.shard_map(f, mesh=mesh, in_specs=(P(),) * nargs, out_specs=P(), check_vma=False),
        compiler_options=options,
    )


def _call(f, *args):
    """A part: calls f and blocks on its result."""
    return functools.partial(lambda *a: jax.block_until_ready(f(*a)), *args)


def _method_parts(
    method: str, batch: dict[str, np.ndarray], rng, config_arg: str
) -> dict[str, callable]:
    config, info, state = _setup(method, config_arg)
    mesh = parallel.create_mesh(1)
    image = jnp.asarray(batch["image"])
    out = {}
    options = conv_ops.compiler_options(config.model.conv_impl)
    step = parallel.wrap_train_step(
        functools.partial(steps.train_step, config=config, label_mode=info.label_mode),
        mesh,
        "jit",
        compiler_options=options,
    )
    # The step donates its state: it gets a copy, the other parts keep `state`.
    holder = {"state": parallel.replicate(jax.tree.map(jnp.copy, state), mesh, "jit")}
    sharded = parallel.shard_batch(batch, mesh, "jit")

    def full():
        holder["state"], m = step(holder["state"], sharded, rng)
        jax.block_until_ready(m["loss"])

    out[f"{method}: full step"] = full
    variables = {"params": state.params, "batch_stats": state.batch_stats}

    def forward(v):
        return state.apply_fn(v, image, train=True, mutable=["batch_stats"])

    outputs, _ = _on_axis(forward, mesh, 1, options)(variables)
    cot = jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape, x.dtype), outputs)

    def unet(params, batch_stats):
        def f(p):
            o, new = forward({"params": p, "batch_stats": batch_stats})
            return sum(jnp.sum(o[k] * cot[k]) for k in o), new

        return jax.value_and_grad(f, has_aux=True)(params)

    out[f"{method}: U-Net fwd+bwd"] = _call(
        _on_axis(unet, mesh, 2, options), state.params, state.batch_stats
    )
    mask = jnp.asarray(batch["mask"])
    ids = jnp.arange(image.shape[0])

    def loss(outputs):
        def f(o):
            return losses.compute_loss(
                config, o, mask, rng, jnp.asarray(1000), info.label_mode, ids, parallel.AXIS
            )[0]

        return jax.value_and_grad(f)(outputs)

    out[f"{method}: loss fwd+bwd"] = _call(_on_axis(loss, mesh, 1, options), outputs)
    grads = jax.tree.map(jnp.ones_like, state.params)
    out[f"{method}: optimizer"] = _call(
        jax.jit(lambda s, g: s.apply_gradients(grads=g).params), state, grads
    )
    if method == "ours":
        out.update(_ours_parts(config, info, outputs, mask, rng, ids))
    return out


def _ours_parts(config, info, outputs, mask, rng, ids) -> dict[str, callable]:
    """The method's own pieces, each with its gradient where the loss takes one."""
    mu, log_var = outputs["logits"], outputs["log_var"]
    t, mode = config.loss.num_samples, info.label_mode
    sample = jax.jit(lambda: losses.sample_noise(rng, t, ids, mu.shape))
    eps = sample()
    targets = losses.targets_from_mask(mask, mode, mu.shape[-1])

    def nll(mu, s):
        return jnp.mean(losses.sampled_nll(mu, s, eps, targets, mode))

    def nll_autodiff(mu, s):
        z = mu[None] + jnp.exp(0.5 * s)[None] * eps
        return jnp.mean(losses.uncertainty_nll(z, targets, mode))

    def u(o):
        return losses.uncertainty_map(config, o, rng, mode, ids, eps=eps)

    grad = functools.partial(jax.value_and_grad, argnums=(0, 1))
    return {
        "ours ... sample noise": _call(sample),
        "ours ... nll fwd+bwd": _call(jax.jit(grad(nll)), mu, log_var),
        "ours ... nll fwd+bwd (autodiff, before)": _call(jax.jit(grad(nll_autodiff)), mu, log_var),
        "ours ... U (entropy of the sample mean)": _call(jax.jit(u), outputs),
    }


def parts(batch: dict[str, np.ndarray], config_arg: str = "Domain1,cpu") -> dict[str, callable]:
    """name -> a function of no arguments that runs the part once and blocks on its result."""
    rng = jax.random.key(1)
    out = {}
    for method in ("ours", "erm"):
        out.update(_method_parts(method, batch, rng, config_arg))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default="Domain1,cpu", help="configs/fundus.py argument (Domain1: paper)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3, help="calls per part and round")
    parser.add_argument("--json", default=None, help="write the medians here")
    args = parser.parse_args()
    rs = np.random.default_rng(0)
    config = fundus.get_config(args.config)
    n, size = config.batch_size, config.data.image_size
    batch = {
        "image": rs.standard_normal((n, size, size, 3)).astype(np.float32),
        "mask": rs.integers(0, 3, (n, size, size)).astype(np.int32),
    }
    fns = parts(batch, args.config)
    compile_s = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        fn()
        compile_s[name] = time.perf_counter() - t
    times = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(args.reps):
                fn()
            times[name].append((time.perf_counter() - t) / args.reps)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(
        f"\n{cpu_name()}, jax {jax.__version__}, CPU plan {conv_ops.cpu_plan()}, "
        f"configs/fundus.py:{args.config} "
        f"({n}x{size}x{size}), {args.rounds} rounds x {args.reps} calls"
    )
    print("| part | ms (median) | min | max | share of its full step | first call s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, v in times.items():
        method = name.split(":")[0].split(" ")[0]
        share = med[name] / med[f"{method}: full step"]
        print(
            f"| {name} | {1e3 * med[name]:.1f} | {1e3 * min(v):.1f} | {1e3 * max(v):.1f} "
            f"| {100 * share:.0f}% | {compile_s[name]:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            record = {"cpu": cpu_name(), "config": args.config, "median_s": med}
            json.dump({**record, "first_call_s": compile_s}, f, indent=1)


if __name__ == "__main__":
    main()
