"""Agreement of the CPU 'fast' path with XLA's at a paper shape, against a float64 reference.

One loss-and-gradient evaluation of the U-Net (widths 32-512, random init, random images and
labels) with `conv_impl='xla'` in float64 (the reference), 'xla' in float32 and 'fast' in
float32. Prints the loss error of each float32 path and, per parameter leaf, the relative
gradient error (max |difference| / max |reference|): the fast path is as exact as XLA's own
float32 when its errors against float64 match XLA's.

  python benchmarks/bench_agreement.py --shape fundus [--batch 8]

About 3 minutes at fundus 8x256x256x3 on the 2-core CPU (the float64 evaluation is the slowest).
"""

import argparse
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from puseg_jax.model import conv_ops  # noqa: E402
from puseg_jax.model.unet import UNet  # noqa: E402

SHAPES = {"demo": (64, 3, 2), "fundus": (256, 3, 3), "prostate": (384, 1, 2)}


def loss_and_grads(impl, dtype, images, labels, classes, widths):
    model = UNet(num_classes=classes, widths=widths, conv_impl=impl, dtype=dtype)
    x = jnp.asarray(images, dtype)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(
        x.astype(jnp.float32)
    )
    variables = jax.tree.map(lambda a: a.astype(dtype), variables)

    def loss_fn(params):
        out, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        logits = out["logits"].astype(dtype)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates["batch_stats"]

    start = time.perf_counter()
    # As the train step compiles it: with the CPU plan's options (conv_ops.cpu_plan()).
    options = conv_ops.compiler_options(impl) if dtype == jnp.float32 else None
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=options)
    (loss, stats), grads = grad_fn(variables["params"])
    jax.block_until_ready(grads)
    print(
        f"{impl} {jnp.dtype(dtype).name} (CPU plan {conv_ops.cpu_plan()}):"
        f" {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    return loss, grads, stats


def relative_errors(tree, ref_tree):
    return [
        float(
            jnp.max(jnp.abs(a.astype(jnp.float64) - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-300)
        )
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref_tree), strict=True)
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="fundus", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    size, channels, classes = SHAPES[args.shape]
    widths = (8, 16, 32, 64, 128) if args.shape == "demo" else (32, 64, 128, 256, 512)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch, size, size, channels)).astype(np.float32)
    labels = jnp.asarray(rng.integers(0, classes, (args.batch, size, size)), jnp.int32)

    ref = loss_and_grads("xla", jnp.float64, images, labels, classes, widths)
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(ref[1])]
    rows = {}
    for impl in ("xla", "fast"):
        loss, grads, stats = loss_and_grads(impl, jnp.float32, images, labels, classes, widths)
        loss_err = abs(float(loss) - float(ref[0])) / abs(float(ref[0]))
        errors = relative_errors(grads, ref[1])
        rows[impl] = errors
        print(
            f"{impl} float32 vs float64: loss {loss_err:.2e}, gradients max {max(errors):.2e} "
            f"median {np.median(errors):.2e}, BatchNorm statistics "
            f"max {max(relative_errors(stats, ref[2])):.2e}"
        )
    print("worst leaves (fast float32):")
    for i in np.argsort(rows["fast"])[-5:]:
        print(f"  {names[i]}: xla {rows['xla'][i]:.2e}, fast {rows['fast'][i]:.2e}")


if __name__ == "__main__":
    main()
