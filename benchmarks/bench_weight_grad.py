"""The 3x3 convolution's weight gradient on the CPU: every formulation XLA can be given, and oneDNN.

Per-op profiles (bench_ops.py) put most of what JAX loses to PyTorch on the CPU in the weight
gradient of the large-image, few-channel layers. This script times, per layer shape, the weight
gradient written in each way that XLA can compile, all computing the same [3, 3, C, K] sum
(checked against XLA's own within float32 tolerance), and PyTorch's (oneDNN) for reference:

  xla          XLA's own (the transposed convolution autodiff produces; what the 'eigen' plans run)
  im2col/P     conv_ops.conv3x3_weight_grad with P pixels a chunk (the 'im2col' plan: P = 2048)
  patches      the whole im2col patch matrix built at once, one matrix product
  shifts9      nine products, one per window offset, of the shifted input with the gradient
  cols3        the three column shifts stacked on channels, three products (one per row shift)
  cols3_scan/R cols3 with rows leading ([H, N, W, C]), a scan over bands of R rows
  ynn_conv     XLA's own, with YNNPACK running the convolutions (forward and input gradient too)
  native       the direct sum compiled on this machine (model/native_conv.py, the 'native' plan)

Every JAX variant is compiled with the 'eigen_reduce' plan's option (reductions on YNNPACK),
except ynn_conv, which adds convolutions to it. Times are the minimum of --reps calls, in ms,
with all cores (or --cores N pinned); keep the machine otherwise idle.

  python benchmarks/bench_weight_grad.py                    # the fundus and prostate layers
  python benchmarks/bench_weight_grad.py --layers 8x256x256x32x32 --variants xla im2col/2048
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import cpu_model  # noqa: E402

# N x H x W x C x K: the full-resolution and next layers of the fundus (256) and prostate (384)
# U-Nets at the paper widths, where the per-op profile shows the gap.
LAYERS = (
    "8x256x256x3x32",
    "8x256x256x32x32",
    "8x256x256x64x32",
    "8x128x128x64x64",
    "8x64x64x128x128",
    "8x384x384x1x32",
    "8x384x384x32x32",
)
VARIANTS = (
    "xla",
    "im2col/2048",
    "im2col/32768",
    "patches",
    "shifts9",
    "cols3",
    "cols3_scan/4",
    "cols3_scan/16",
    "ynn_conv",
    "native",
    "torch",
)
_REDUCE = "LIBRARY_FUSION_TYPE_REDUCE"


def _jax_variant(name: str):
    """(function (x, g) -> dW, XLA compiler options) for a JAX variant name."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from puseg_jax.model import conv_ops

    contract_pixels = (((0,), (0,)), ((), ()))

    def xla(x, g):
        kernel = jnp.zeros((3, 3, x.shape[-1], g.shape[-1]), x.dtype)
        _, vjp = jax.vjp(lambda k: conv_ops._conv_same(x, k), kernel)
        return vjp(g)[0]

    def patches(x, g):
        n, h, w, c = x.shape
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        cols = [xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]
        pt = jnp.concatenate(cols, -1).reshape(-1, 9 * c)
        dw = lax.dot_general(pt, g.reshape(-1, g.shape[-1]), contract_pixels)
        return dw.reshape(3, 3, c, -1)

    def shifts9(x, g):
        n, h, w, c = x.shape
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        gm = g.reshape(-1, g.shape[-1])
        dws = [
            lax.dot_general(xp[:, i : i + h, j : j + w, :].reshape(-1, c), gm, contract_pixels)
            for i in range(3)
            for j in range(3)
        ]
        return jnp.stack(dws).reshape(3, 3, c, -1)

    def rows_leading_cols3(x):
        # [H + 2, N, W, 3C]: rows leading, so that a band of rows is one contiguous block
        n, h, w, c = x.shape
        xp = jnp.pad(jnp.transpose(x, (1, 0, 2, 3)), ((1, 1), (0, 0), (1, 1), (0, 0)))
        return jnp.concatenate([xp[:, :, j : j + w, :] for j in range(3)], -1)

    def cols3(x, g):
        n, h, w, c = x.shape
        x3 = rows_leading_cols3(x)
        gm = jnp.transpose(g, (1, 0, 2, 3)).reshape(-1, g.shape[-1])
        dws = [
            lax.dot_general(x3[i : i + h].reshape(-1, 3 * c), gm, contract_pixels) for i in range(3)
        ]
        return jnp.stack(dws).reshape(3, 3, c, -1)

    def cols3_scan(rows):
        def f(x, g):
            n, h, w, c = x.shape
            k = g.shape[-1]
            x3 = rows_leading_cols3(x)
            gt = jnp.transpose(g, (1, 0, 2, 3))

            def body(acc, r0):
                gb = lax.dynamic_slice_in_dim(gt, r0, rows, 0).reshape(-1, k)
                xb = lax.dynamic_slice_in_dim(x3, r0, rows + 2, 0)
                dws = [
                    lax.dot_general(xb[i : i + rows].reshape(-1, 3 * c), gb, contract_pixels)
                    for i in range(3)
                ]
                return acc + jnp.stack(dws), None

            acc, _ = lax.scan(body, jnp.zeros((3, 3 * c, k)), jnp.arange(0, h, rows))
            return acc.reshape(3, 3, c, k)

        return f

    def im2col(chunk):
        def f(x, g):
            old = conv_ops._CHUNK_PIXELS
            conv_ops._CHUNK_PIXELS = chunk  # read at trace time
            try:
                return conv_ops.conv3x3_weight_grad(x, g)
            finally:
                conv_ops._CHUNK_PIXELS = old

        return f

    options = {"xla_cpu_experimental_ynn_fusion_type": _REDUCE}
    base, _, arg = name.partition("/")
    if base == "xla":
        return xla, options
    if base == "native":
        from puseg_jax.model import native_conv

        if not native_conv.available():
            raise SystemExit(f"native: {native_conv.unavailable_reason()}")
        return native_conv.conv3x3_weight_grad, options
    if base == "ynn_conv":
        conv = f"{_REDUCE},LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
        return xla, {"xla_cpu_experimental_ynn_fusion_type": conv}
    if base == "im2col":
        return im2col(int(arg or 2048)), options
    if base == "cols3_scan":
        return cols3_scan(int(arg or 16)), options
    if base in ("patches", "shifts9", "cols3"):
        return {"patches": patches, "shifts9": shifts9, "cols3": cols3}[base], options
    raise ValueError(f"unknown variant {name!r}")


def time_compiled(fn, options, arrays, reps: int):
    """(ms, output) of `fn` jitted and compiled with XLA `options`: the minimum of `reps` calls
    after one untimed call."""
    import jax

    arrays = [jax.device_put(a) for a in arrays]
    compiled = jax.jit(fn).trace(*arrays).lower().compile(options)
    out = np.asarray(jax.block_until_ready(compiled(*arrays)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*arrays))
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times), out


def time_jax(name: str, x: np.ndarray, g: np.ndarray, reps: int):
    """(ms, output) of variant `name`, or None where it does not apply to the layer."""
    if name.startswith("cols3_scan/") and x.shape[1] % int(name.split("/")[1]):
        return None
    return time_compiled(*_jax_variant(name), (x, g), reps)


def time_torch(x: np.ndarray, g: np.ndarray, reps: int):
    """ms of PyTorch's weight gradient (channels_last, oneDNN) for the same layer."""
    import torch

    c, k = x.shape[-1], g.shape[-1]
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    gt = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(c, k, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    y = conv(xt)

    def once():
        return torch.autograd.grad(y, [conv.weight], gt, retain_graph=True)[0]

    once()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def _ms(ms: float) -> str:
    return f"{ms:.1f}" if ms < 10 else f"{ms:.0f}"


def layer_table(argv, description: str, layers, variants, inputs, measure) -> None:
    """Parses the common options and prints a markdown table: a row per layer, a column per
    variant, in ms ('-' where `measure` returns None). `inputs(rng, n, h, w, c, k)` makes a
    layer's arrays; `measure(name, arrays, reps)` returns (ms, output or None). The first
    output is the reference: the script stops where another is off by more than 1e-4 of it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--layers", nargs="+", default=list(layers), help="NxHxWxCxK")
    parser.add_argument("--variants", nargs="+", default=list(variants))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cores", type=int, default=0, help="pin to the first N cores (0: all)")
    args = parser.parse_args(argv)
    if args.cores:
        os.sched_setaffinity(0, set(range(args.cores)))
    print(f"machine: {cpu_model()}, {len(os.sched_getaffinity(0))} cores; ms, min of {args.reps}")
    print("| layer N x H x W, C -> K | " + " | ".join(args.variants) + " |")
    print("|---|" + "---:|" * len(args.variants))
    rng = np.random.default_rng(0)
    for spec in args.layers:
        n, h, w, c, k = (int(v) for v in spec.split("x"))
        arrays = inputs(rng, n, h, w, c, k)
        cells, reference = [], None
        for name in args.variants:
            result = measure(name, arrays, args.reps)
            if result is None:
                cells.append("-")
                continue
            ms, out = result
            if out is not None and reference is None:
                reference = out
            elif out is not None:
                err = float(np.max(np.abs(out - reference)) / np.max(np.abs(reference)))
                if err > 1e-4:
                    raise SystemExit(f"{name} at {spec}: relative error {err:.1e}")
            cells.append(_ms(ms))
        print(f"| {n}x{h}x{w}, {c} -> {k} | " + " | ".join(cells) + " |", flush=True)


def main(argv=None):
    def inputs(rng, n, h, w, c, k):
        x = rng.standard_normal((n, h, w, c), dtype=np.float32)
        return x, rng.standard_normal((n, h, w, k), dtype=np.float32)

    def measure(name, arrays, reps):
        if name == "torch":
            return time_torch(*arrays, reps), None
        return time_jax(name, *arrays, reps)  # the first (xla by default) is the reference

    layer_table(argv, __doc__.split("\n\n")[0], LAYERS, VARIANTS, inputs, measure)


if __name__ == "__main__":
    main()
