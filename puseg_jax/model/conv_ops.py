"""The U-Net's convolutions and pooling, with a backend-selected implementation.

`impl='xla'` is Flax's `nn.Conv` as is: XLA's native convolution and its native gradients. It is
the right choice on GPU and TPU.

`impl='fast'` is the same `nn.Conv` module (same parameter name, shape and initializer, so one
checkpoint serves both) whose convolution function carries a `jax.custom_vjp`:

  * forward: XLA's convolution (unchanged);
  * input gradient: XLA's transposed convolution (what autodiff of the forward produces);
  * weight gradient: an im2col matrix product accumulated over chunks of image rows.

Why: on the CPU, XLA computes the weight gradient of a 3x3 convolution as a convolution whose
"kernel" is the whole image, which runs at a tenth of the speed of the forward pass (measured on a
2-core AMD EPYC: 8x128x128x64->64 forward ~0.11 s, weight gradient ~1.5 s). The same reduction
written as one big (N*H*W, 9*C) x (N*H*W, K) matrix product is faster but still poor, because a
matrix product with a small output and a huge contraction is badly parallelised and streams the
9x-inflated patch matrix through memory. Cutting the rows into chunks of about
`_CHUNK_PIXELS` pixels keeps each chunk's patch matrix in cache and brings the weight gradient to
about the time of the forward pass. `benchmarks/README.md` has the numbers of each formulation.

The same `impl` switch selects the other two CPU replacements the U-Net uses: `ConvTranspose`
(the 2x2 stride-2 up-convolution as a per-pixel matrix product, whose weight gradient XLA's CPU
emitter runs naively as a dilated convolution) and `max_pool2x2` (the 2x2 max-pool whose
gradient is one elementwise pass instead of XLA's CPU select-and-scatter). Each gives XLA's
numbers (the max-pool bit for bit, the others within float32 rounding).

`impl='auto'` picks 'fast' on the CPU backend and 'xla' elsewhere.

Which weight gradient 'fast' uses is chosen once per process by the CPU's features, from
measurements on each CPU kind (`cpu_plan`, benchmarks/README.md):

  * 'im2col' (AVX2 CPUs, e.g. the 2-core AMD EPYC Zen 3): the chunked im2col above; XLA's
    convolutions run through its default library (YNNPACK).
  * 'eigen' (Intel CPUs with AVX-512, measured on a 2-core Xeon with AVX-512 and AMX): XLA's
    own weight gradient, with the compiler option that takes convolutions off YNNPACK
    (`compiler_options`): there YNNPACK's weight gradient is 2.7x slower than Eigen's, the chunked
    im2col 2.3x, and Eigen's forward and input gradient are ~10% faster than YNNPACK's, while
    YNNPACK keeps the elementwise and reduction fusions (BatchNorm), where it is 2.3x faster.
    The option only takes effect in a jit that passes `compiler_options(impl)`, as the train and
    eval steps do (parallel.py).
  * 'eigen_reduce' (AMD CPUs with AVX-512, measured on a 2-core AMD EPYC Zen 4): as 'eigen', but
    only the reductions stay on YNNPACK: there its elementwise fusions made the whole fundus
    step 1.3x slower (0.76x -> 0.98x PyTorch channels_last; prostate 0.70x -> 0.94x).
  * 'native' (AMD CPUs with AVX-512 where the machine has a C++ compiler): 'eigen_reduce', with
    two kernels of `native_conv` compiled on this machine. The weight gradient of the layers of
    at least `_NATIVE_MIN_PIXELS` pixels an image (and `_NATIVE_MIN_OUT_CHANNELS` output
    channels) is its direct sum, 1.6-3.3x faster than XLA's there. The forward pass and the
    input gradient of the layers of at least `_WINOGRAD_MIN_PIXELS` pixels and
    `_WINOGRAD_MIN_WORK` N H W C K whose channel counts are multiples of 16 are its Winograd
    F(2x2, 3x3) convolution, 1.2-2.1x faster than Eigen's there. The smaller layers keep
    XLA's, faster at many channels and few pixels.

This module imports only jax and flax: `benchmarks/gpu.sh` runs it on a machine without the
project's other dependencies.
"""

import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from puseg_jax.model import native_conv

IMPLS = ("xla", "fast")
CPU_PLANS = ("im2col", "eigen", "eigen_reduce", "native")

# Pixels (rows of the patch matrix) per chunk of the weight-gradient reduction. 2048 pixels of
# 9 * 64 float32 patches are 4.7 MB: within the L3 cache, large enough for an efficient product.
_CHUNK_PIXELS = 2048

_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


def resolve_impl(impl: str) -> str:
    """Maps 'auto' to the implementation for the default backend and validates the name.

    Args:
      impl: 'auto', 'xla' or 'fast'.

    Returns:
      'xla' or 'fast'.
    """
    if impl == "auto":
        return "fast" if jax.default_backend() == "cpu" else "xla"
    if impl not in IMPLS:
        raise ValueError(f"Unknown conv implementation {impl!r}; expected 'auto', 'xla' or 'fast'.")
    return impl


# XLA:CPU library fusions each plan with XLA's own weight gradient keeps on YNNPACK (the value
# of `xla_cpu_experimental_ynn_fusion_type`; measured in benchmarks/README.md): convolutions are
# never among them (they run with Eigen); the elementwise fusions only on the Intel Xeon, where
# YNNPACK ran BatchNorm + ReLU 2.3x faster, not on the AMD EPYC (Zen 4), where they made the
# whole step 1.3x slower (the max-pool and the elementwise chains of the backward pass).
_YNN_FUSIONS = {
    "eigen": "LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE",
    "eigen_reduce": "LIBRARY_FUSION_TYPE_REDUCE",
    "native": "LIBRARY_FUSION_TYPE_REDUCE",
}
# The 'native' plan's weight gradient runs natively from this many pixels an image (64x64): on
# the Zen 4 it took 54 ms against XLA's 87 at 8x64x64 128 -> 128 and 50 against 164 at 8x256x256
# 32 -> 32, but 62 against 57 at 8x32x32 256 -> 256 and 75 against 50 at 8x16x16 512 -> 512
# (`bench_weight_grad.py`, benchmarks/README.md).
_NATIVE_MIN_PIXELS = 64 * 64
# ... and from this many output channels: fewer than one vector of them (the demo's 8) take the
# kernel's scalar path, slower than XLA.
_NATIVE_MIN_OUT_CHANNELS = 16
# The 'native' plan's forward pass and input gradient run by Winograd's F(2x2, 3x3)
# (`native_conv.conv3x3`) from this many pixels an image (24x24), where both channel counts are
# multiples of `native_conv.WINOGRAD_CHANNEL_MULTIPLE`. On the Zen 4 (`bench_conv_forward.py`,
# benchmarks/README.md) it took 121 ms against Eigen's 172 at 8x384x384 32 -> 32, 27 against 53
# at 8x64x64 128 -> 128 and 93 against 108 at 8x24x24 512 -> 512, but 62 against 49 at 8x16x16
# 512 -> 512 and 9 against 3 at 8x8x8 256 -> 256, where the transformed kernel, 16 C K floats
# read for every chunk of tiles, outweighs the image.
_WINOGRAD_MIN_PIXELS = 24 * 24
# ... and from this much work, N H W C K (a batch of 8 at 128x128, 16 -> 16): each call costs
# a fixed amount besides (threads started, the kernel transformed, XLA's scheduling around an
# opaque call), so the demo's layers (16x32x32, 16-32 channels), each faster alone by Winograd,
# made its whole step 8 % slower (0.087 s against 0.080).
_WINOGRAD_MIN_WORK = 8 * 128 * 128 * 16 * 16
_cpu_plan: str | None = None
_eigen_ynn: str | None = None  # `set_eigen_ynn_fusions`: benchmarks compare other sets


def _cpu_info() -> tuple[str, set[str]]:
    """(vendor_id, flags) of the first CPU in /proc/cpuinfo; ('', set()) where unreadable."""
    vendor, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id") and not vendor:
                    vendor = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return vendor, flags


def auto_plan(vendor: str, flags: set[str], native: bool = False) -> str:
    """The plan for a CPU of this vendor and these flags: 'im2col' without AVX-512, 'eigen' on
    non-AMD CPUs with it, and on AMD CPUs with it 'native' where the native weight gradient
    builds (`native`), else 'eigen_reduce' (each measured fastest on that kind:
    benchmarks/README.md)."""
    if "avx512f" not in flags:
        return "im2col"
    if vendor != "AuthenticAMD":
        return "eigen"
    return "native" if native else "eigen_reduce"


def cpu_plan() -> str:
    """The 'fast' path's plan on this CPU: 'im2col', 'eigen' or 'eigen_reduce'.

    Set by $PUSEG_CPU_CONV_PLAN or `set_cpu_plan`; otherwise `auto_plan` of this CPU: what was
    measured fastest on that kind of CPU (module docstring). Decided once per process.

    Returns:
      One of `CPU_PLANS`.
    """
    global _cpu_plan
    if _cpu_plan is None:
        plan = os.environ.get("PUSEG_CPU_CONV_PLAN", "")
        if plan and plan not in CPU_PLANS:
            raise ValueError(f"PUSEG_CPU_CONV_PLAN={plan!r}; expected one of {CPU_PLANS}")
        if plan == "native" and not native_conv.available():
            raise ValueError(f"PUSEG_CPU_CONV_PLAN=native: {native_conv.unavailable_reason()}")
        if not plan:
            vendor, flags = _cpu_info()
            # Building the native kernel is only tried where it would be chosen.
            wants_native = auto_plan(vendor, flags, native=True) == "native"
            plan = auto_plan(vendor, flags, native=wants_native and native_conv.available())
        _cpu_plan = plan
    return _cpu_plan


def set_cpu_plan(plan: str | None) -> None:
    """Forces the CPU plan (one of `CPU_PLANS`; None: back to the automatic choice). Affects
    functions traced afterwards (benchmarks and tests compare the plans with it)."""
    global _cpu_plan
    if plan is not None and plan not in CPU_PLANS:
        raise ValueError(f"Unknown CPU plan {plan!r}; expected one of {CPU_PLANS}")
    if plan == "native" and not native_conv.available():
        raise ValueError(f"CPU plan 'native': {native_conv.unavailable_reason()}")
    _cpu_plan = plan


def compiler_options(impl: str = "auto") -> dict[str, str] | None:
    """XLA compiler options for a jit that runs the U-Net with `impl` (None if it needs none).

    Args:
      impl: the model's conv_impl ('auto', 'xla' or 'fast').

    Returns:
      For 'fast' on the CPU under an 'eigen' plan, the option that runs the convolutions with
      Eigen instead of YNNPACK and names the fusions that stay on YNNPACK; otherwise None.
    """
    if resolve_impl(impl) != "fast" or jax.default_backend() != "cpu":
        return None
    plan = cpu_plan()
    if plan not in _YNN_FUSIONS:
        return None
    ynn = _YNN_FUSIONS[plan] if _eigen_ynn is None else _eigen_ynn
    return {"xla_cpu_experimental_ynn_fusion_type": ynn}


def set_eigen_ynn_fusions(types: str | None) -> None:
    """Sets the XLA:CPU library fusions the 'eigen' plans leave on YNNPACK (a comma-separated
    list of LIBRARY_FUSION_TYPE_* names, '' for none; None: back to the default). For benchmarks
    that compare sets; affects functions compiled afterwards."""
    global _eigen_ynn
    _eigen_ynn = types


def _conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_NHWC_HWIO)


def _rows_per_chunk(n: int, h: int, w: int) -> int:
    """Largest divisor of h with n * rows * w <= _CHUNK_PIXELS (at least 1)."""
    target = max(1, _CHUNK_PIXELS // (n * w))
    return max(r for r in range(1, h + 1) if h % r == 0 and r <= target)


def _row_patches(padded: jax.Array, row0: jax.Array, rows: int, offsets) -> jax.Array:
    """[N, rows, W, 9*C] patches of a spatially padded [N, H+2, W+2, C] array.

    `offsets` lists the nine (di, dj) window offsets in the order of the patch channels.
    """
    w = padded.shape[2] - 2
    band = lax.dynamic_slice_in_dim(padded, row0, rows + 2, axis=1)
    return jnp.concatenate([band[:, di : di + rows, dj : dj + w, :] for di, dj in offsets], -1)


def conv3x3_weight_grad(x: jax.Array, g: jax.Array) -> jax.Array:
    """Gradient of a 3x3 'SAME' stride-1 NHWC convolution with respect to its HWIO kernel.

    dW[i, j, c, k] = sum_{n, h, w} xpad[n, h + i, w + j, c] * g[n, h, w, k], computed as a sum
    over chunks of image rows of im2col matrix products (see the module docstring). The patches
    are taken of whichever of x and g has fewer channels, since building them costs 9x that
    tensor's size.

    Args:
      x: the convolution's input, [N, H, W, C].
      g: the cotangent of its output, [N, H, W, K], same dtype as x.

    Returns:
      [3, 3, C, K] in x's dtype, accumulated in float32.
    """
    n, h, w, c = x.shape
    k = g.shape[-1]
    rows = _rows_per_chunk(n, h, w)
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    patches_of_x = c <= k
    if patches_of_x:
        # dW[i, j] = sum xpad[h + i, w + j]^T g[h, w]
        padded, other = jnp.pad(x, pad), g
        offsets = [(i, j) for i in range(3) for j in range(3)]
    else:
        # dW[i, j] = sum x[h, w]^T gpad[h + 2 - i, w + 2 - j]
        padded, other = jnp.pad(g, pad), x
        offsets = [(2 - i, 2 - j) for i in range(3) for j in range(3)]

    def chunk_product(row0):
        patches = _row_patches(padded, row0, rows, offsets).reshape(-1, 9 * padded.shape[-1])
        other_rows = lax.dynamic_slice_in_dim(other, row0, rows, axis=1)
        other_rows = other_rows.reshape(-1, other.shape[-1])
        lhs, rhs = (patches, other_rows) if patches_of_x else (other_rows, patches)
        return lax.dot_general(
            lhs, rhs, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )

    if rows == h:
        acc = chunk_product(jnp.int32(0))
    else:

        def body(acc, row0):
            return acc + chunk_product(row0), None

        out_shape = (9 * c, k) if patches_of_x else (c, 9 * k)
        acc, _ = lax.scan(
            body, jnp.zeros(out_shape, jnp.float32), jnp.arange(0, h, rows, dtype=jnp.int32)
        )
    if patches_of_x:
        dw = acc.reshape(3, 3, c, k)
    else:
        dw = jnp.transpose(acc.reshape(c, 3, 3, k), (1, 2, 0, 3))
    return dw.astype(x.dtype)


@jax.custom_vjp
def conv3x3_fast(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 'SAME' stride-1 NHWC/HWIO convolution with the CPU plan's gradients (and, under
    'native', its forward pass)."""
    return _conv3x3_forward(x, kernel)


def _conv3x3_forward(x, kernel):
    if _winograd_layer(cpu_plan(), x, kernel):
        return native_conv.conv3x3(x, kernel)
    return _conv_same(x, kernel)


def _conv3x3_fast_fwd(x, kernel):
    return _conv3x3_forward(x, kernel), (x, kernel)


def _conv3x3_fast_bwd(residuals, g):
    x, kernel = residuals
    plan = cpu_plan()
    # The input gradient: XLA's own transposed convolution, as under plain autodiff, or under
    # 'native' the Winograd convolution of g with the turned kernel.
    if _winograd_layer(plan, g, kernel):  # (the rule is symmetric in C and K)
        dx = native_conv.conv3x3_input_grad(g, kernel)
    else:
        _, conv_vjp_x = jax.vjp(lambda x_: _conv_same(x_, kernel), x)
        (dx,) = conv_vjp_x(g)
    if _native_layer(plan, x, g):
        return dx, native_conv.conv3x3_weight_grad(x, g).astype(kernel.dtype)
    if plan in _YNN_FUSIONS:
        # XLA's own weight gradient, as under plain autodiff (fast under `compiler_options`).
        _, conv_vjp_kernel = jax.vjp(lambda k_: _conv_same(x, k_), kernel)
        return dx, conv_vjp_kernel(g)[0]
    return dx, conv3x3_weight_grad(x, g)


def _native_cpu(plan: str, *arrays: jax.Array) -> bool:
    # 'fast' forced on an accelerator keeps XLA's convolutions.
    return (
        plan == "native"
        and jax.default_backend() == "cpu"
        and all(a.dtype == jnp.float32 for a in arrays)
    )


def _native_layer(plan: str, x: jax.Array, g: jax.Array) -> bool:
    """Whether the 'native' plan takes this layer's weight gradient natively (float32 on the
    CPU, at least `_NATIVE_MIN_PIXELS` pixels and `_NATIVE_MIN_OUT_CHANNELS` output channels)."""
    return (
        _native_cpu(plan, x, g)
        and x.shape[1] * x.shape[2] >= _NATIVE_MIN_PIXELS
        and g.shape[-1] >= _NATIVE_MIN_OUT_CHANNELS
    )


def _winograd_layer(plan: str, x: jax.Array, kernel: jax.Array) -> bool:
    """Whether the 'native' plan convolves x [N, H, W, C] with kernel [3, 3, C, K] by Winograd
    (float32 on the CPU, at least `_WINOGRAD_MIN_PIXELS` pixels an image and
    `_WINOGRAD_MIN_WORK` N H W C K, C and K multiples of
    `native_conv.WINOGRAD_CHANNEL_MULTIPLE`)."""
    m = native_conv.WINOGRAD_CHANNEL_MULTIPLE
    n, h, w = x.shape[:3]
    return (
        _native_cpu(plan, x, kernel)
        and h * w >= _WINOGRAD_MIN_PIXELS
        and n * h * w * kernel.shape[2] * kernel.shape[3] >= _WINOGRAD_MIN_WORK
        and kernel.shape[2] % m == 0
        and kernel.shape[3] % m == 0
    )


conv3x3_fast.defvjp(_conv3x3_fast_fwd, _conv3x3_fast_bwd)


def fast_conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **unused,
) -> jax.Array:
    """Drop-in for `lax.conv_general_dilated` as Flax's `nn.Conv` calls it, for 3x3 'SAME'.

    Only the configuration `Conv3x3` uses is accepted; anything else is an error rather than a
    silent fallback, so a change of the module is noticed.
    """
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    expected = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC_HWIO)
    ones = (1, 1)
    if (
        rhs.shape[:2] != (3, 3)
        or tuple(window_strides) != ones
        or padding not in ("SAME", ((1, 1), (1, 1)), [(1, 1), (1, 1)])
        or tuple(lhs_dilation or ones) != ones
        or tuple(rhs_dilation or ones) != ones
        or dn != expected
        or feature_group_count != 1
        or precision is not None
        or lhs.dtype != rhs.dtype
    ):
        raise NotImplementedError(
            "conv_ops 'fast' supports only 3x3 'SAME' stride-1 NHWC/HWIO convolutions with"
            " equal input and kernel dtypes."
        )
    return conv3x3_fast(lhs, rhs)


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, max(limit, 1)) + 1) if n % d == 0)


def rows_weight_grad(a: jax.Array, g: jax.Array) -> jax.Array:
    """a^T g for a [P, C] and g [P, K] with P large, as a sum over chunks of rows (float32).

    The weight gradient of a per-pixel matrix product. XLA's CPU matrix product is slow for this
    shape (tiny output, huge contraction); chunks of about _CHUNK_PIXELS rows are not.
    """
    p = a.shape[0]
    rows = _largest_divisor_at_most(p, _CHUNK_PIXELS)

    def product(a_rows, g_rows):
        return lax.dot_general(
            a_rows, g_rows, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )

    if rows == p or rows < _CHUNK_PIXELS // 4:
        return product(a, g)

    def body(acc, chunk):
        return acc + product(*chunk), None

    chunks = (a.reshape(p // rows, rows, -1), g.reshape(p // rows, rows, -1))
    acc, _ = lax.scan(body, jnp.zeros((a.shape[1], g.shape[1]), jnp.float32), chunks)
    return acc


@jax.custom_vjp
def pixel_matmul(a: jax.Array, w: jax.Array) -> jax.Array:
    """a @ w for a [P, C] (pixels by channels) and w [C, K], with a chunked weight gradient."""
    return a @ w


def _pixel_matmul_fwd(a, w):
    return a @ w, (a, w)


def _pixel_matmul_bwd(residuals, g):
    a, w = residuals
    return g @ w.T, rows_weight_grad(a, g).astype(w.dtype)


pixel_matmul.defvjp(_pixel_matmul_fwd, _pixel_matmul_bwd)


def upconv2x2_fast(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """lax.conv_transpose(x, kernel, (2, 2), 'SAME') for a 2x2 HWIO kernel, as a matmul.

    With stride equal to the kernel size every output pixel sees one input pixel:
    y[n, 2h + a, 2w + b] = x[n, h, w] @ kernel[1 - a, 1 - b] (lax.conv_transpose does not flip
    the kernel, and 'SAME' padding puts tap 1 on the even outputs), i.e. a per-pixel matrix
    product to 4K channels followed by a depth-to-space shuffle.
    """
    n, h, w, c = x.shape
    k = kernel.shape[-1]
    w_flat = jnp.transpose(kernel[::-1, ::-1], (2, 0, 1, 3)).reshape(c, 4 * k)
    y = pixel_matmul(x.reshape(-1, c), w_flat).reshape(n, h, w, 2, 2, k)
    return jnp.transpose(y, (0, 1, 3, 2, 4, 5)).reshape(n, 2 * h, 2 * w, k)


def _max_pool2x2_forward(x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    rows = x.reshape(n * (h // 2), 2, w // 2, 2 * c)  # a bitcast: row pairs, column pairs
    pairs = jnp.maximum(rows[:, 0], rows[:, 1])
    return jnp.maximum(pairs[..., :c], pairs[..., c:]).reshape(n, h // 2, w // 2, c)


@jax.custom_vjp
def _max_pool2x2_fast(x: jax.Array) -> jax.Array:
    return _max_pool2x2_forward(x)


def _max_pool2x2_fast_fwd(x):
    y = _max_pool2x2_forward(x)
    return y, (x, y)


def _max_pool2x2_fast_bwd(residuals, g):
    # Each output's gradient goes to the first maximum of its window in row-major order, which
    # is what XLA's select-and-scatter (the gradient of `nn.max_pool`) does, ties included.
    x, y = residuals
    n, h, w, c = x.shape
    windows = x.reshape(n, h // 2, 2, w // 2, 2, c)
    shape6 = (1, 1, 2, 1, 2, 1)
    position = 2 * lax.broadcasted_iota(jnp.int32, shape6, 2) + lax.broadcasted_iota(
        jnp.int32, shape6, 4
    )
    is_max = windows == y[:, :, None, :, None, :]
    first = jnp.min(jnp.where(is_max, position, 4), axis=(2, 4))
    dx = jnp.where(position == first[:, :, None, :, None, :], g[:, :, None, :, None, :], 0)
    return (dx.reshape(n, h, w, c).astype(x.dtype),)


_max_pool2x2_fast.defvjp(_max_pool2x2_fast_fwd, _max_pool2x2_fast_bwd)


def max_pool2x2(x: jax.Array, impl: str = "xla") -> jax.Array:
    """2x2 stride-2 max pooling of NHWC `x` (H and W even), `nn.max_pool(x, (2, 2), (2, 2))`.

    'fast' gives the same values and the same gradient (to the first maximum of each window, as
    XLA does) but computes the gradient as one elementwise pass instead of XLA's CPU
    select-and-scatter, which took ~6% of a prostate train step (8x384x384x32: 615 ms against
    135 ms, forward and backward).
    """
    impl = resolve_impl(impl)
    if impl == "xla":
        return nn.max_pool(x, (2, 2), strides=(2, 2))
    if x.shape[1] % 2 or x.shape[2] % 2:
        raise NotImplementedError(f"max_pool2x2 'fast' needs even H and W, got {x.shape}")
    return _max_pool2x2_fast(x)


class ConvTranspose(nn.Module):
    """2x2 stride-2 'SAME' transposed convolution with bias: `nn.ConvTranspose`'s replacement.

    Declares the same parameters as `nn.ConvTranspose(features, (2, 2), strides=(2, 2))`
    (`kernel` (2, 2, C, K) by lecun_normal, `bias` (K,) zeros) and, being named ConvTranspose,
    gets the same automatic module name: a checkpoint of one loads into the other. 'xla' computes
    exactly what nn.ConvTranspose computes; 'fast' computes it as a matrix product, because XLA's
    CPU weight gradient of this op (a convolution with a dilated kernel) is very slow (on the
    2-core CPU it was ~60% of a whole U-Net train step).

    Attributes:
      features: output channels K.
      kernel_size: must be (2, 2).
      strides: must be (2, 2).
      dtype: compute dtype (None: from the input); parameters stay float32.
      impl: 'xla', 'fast' or 'auto'.
    """

    features: int
    kernel_size: Sequence[int] = (2, 2)
    strides: Sequence[int] = (2, 2)
    dtype: Any = None
    impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if tuple(self.kernel_size) != (2, 2) or tuple(self.strides) != (2, 2):
            raise NotImplementedError("conv_ops.ConvTranspose supports only 2x2, stride 2.")
        impl = resolve_impl(self.impl)
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (2, 2, x.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        if impl == "fast":
            y = upconv2x2_fast(x, kernel)
        else:
            y = lax.conv_transpose(x, kernel, (2, 2), "SAME")
        return y + bias


class Conv3x3(nn.Module):
    """3x3 'SAME' convolution without bias (every use is followed by a norm).

    Both implementations are `nn.Conv` named `Conv_0` with a `kernel` of shape (3, 3, C, K)
    initialised by lecun_normal: parameters are interchangeable between them.

    Attributes:
      features: output channels K.
      impl: 'xla', 'fast' or 'auto' (see the module docstring).
      dtype: compute dtype; the kernel parameter stays float32.
    """

    features: int
    impl: str = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        impl = resolve_impl(self.impl)
        conv_fn = fast_conv_general_dilated if impl == "fast" else None
        return nn.Conv(
            self.features,
            (3, 3),
            padding="SAME",
            use_bias=False,
            dtype=self.dtype,
            conv_general_dilated=conv_fn,
            name="Conv_0",
        )(x)
