"""conv_ops: the 'fast' CPU convolutions give XLA's numbers, with the same parameters."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from puseg_jax.model import conv_ops, native_conv
from puseg_jax.model.unet import UNet

FP32_RTOL = 1e-4
# bf16 has an 8-bit mantissa (relative step 2^-8 = 0.004); sums of ~100-1000 rounded products,
# accumulated in float32 by both paths but rounded differently, stay within a few steps.
BF16_RTOL = 3e-2


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _conv_and_grads(conv, x, kernel, g):
    y, vjp = jax.vjp(conv, x, kernel)
    return (y, *vjp(g))


@pytest.fixture
def small_chunks(monkeypatch):
    # Chunks of 64 pixels make the small test shapes take the multi-chunk (scan) path.
    monkeypatch.setattr(conv_ops, "_CHUNK_PIXELS", 64)


def _require_native():
    """Skips (fails under CI, $PUSEG_REQUIRE_NATIVE=1) where the native kernel cannot build."""
    if not native_conv.available():
        reason = f"native kernels unavailable: {native_conv.unavailable_reason()}"
        if os.environ.get("PUSEG_REQUIRE_NATIVE") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(params=conv_ops.CPU_PLANS)
def plan(request, monkeypatch):
    """Each CPU plan of the 'fast' path in turn (whatever this CPU would choose). Under
    'native' every layer of the small test shapes takes the native weight gradient, and those
    whose channels are multiples of 16 the Winograd forward pass and input gradient."""
    if request.param == "native":
        _require_native()
        monkeypatch.setattr(conv_ops, "_NATIVE_MIN_PIXELS", 1)
        monkeypatch.setattr(conv_ops, "_WINOGRAD_MIN_PIXELS", 1)
        monkeypatch.setattr(conv_ops, "_WINOGRAD_MIN_WORK", 1)
    conv_ops.set_cpu_plan(request.param)
    yield request.param
    conv_ops.set_cpu_plan(None)


def _fast_jit(fn):
    # As the train and eval steps compile it: with the plan's compiler options.
    return jax.jit(fn, compiler_options=conv_ops.compiler_options("fast"))


@pytest.mark.parametrize(
    "shape, chunked",
    [
        ((2, 16, 16, 3, 8), True),  # C < K: patches of x; first-layer-like
        ((2, 12, 16, 16, 8), True),  # C > K: patches of the output gradient; decoder-like
        ((1, 10, 6, 5, 5), False),  # odd sizes, one image, one chunk (no scan)
        ((2, 10, 9, 16, 32), False),  # channels the 'native' plan's Winograd convolution takes
    ],
)
def test_fast_conv_matches_xla_fp32(shape, chunked, monkeypatch, plan):
    if chunked:
        monkeypatch.setattr(conv_ops, "_CHUNK_PIXELS", 64)
    n, h, w, c, k = shape
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (n, h, w, c))
    kernel = jax.random.normal(keys[1], (3, 3, c, k))
    g = jax.random.normal(keys[2], (n, h, w, k))
    fast = _fast_jit(lambda *a: _conv_and_grads(conv_ops.conv3x3_fast, *a))(x, kernel, g)
    ref = jax.jit(lambda *a: _conv_and_grads(conv_ops._conv_same, *a))(x, kernel, g)
    for name, a, b in zip(("y", "dx", "dkernel"), fast, ref, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert _rel_err(a, b) < FP32_RTOL, name


def test_fast_conv_matches_xla_bf16(small_chunks, plan):
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (2, 16, 16, 8), jnp.bfloat16)
    kernel = jax.random.normal(keys[1], (3, 3, 8, 16), jnp.bfloat16)
    g = jax.random.normal(keys[2], (2, 16, 16, 16), jnp.bfloat16)
    fast = _fast_jit(lambda *a: _conv_and_grads(conv_ops.conv3x3_fast, *a))(x, kernel, g)
    ref = jax.jit(lambda *a: _conv_and_grads(conv_ops._conv_same, *a))(x, kernel, g)
    for name, a, b in zip(("y", "dx", "dkernel"), fast, ref, strict=True):
        assert a.dtype == jnp.bfloat16, name
        assert _rel_err(a, b) < BF16_RTOL, name


def test_pixel_matmul_weight_grad_chunks(small_chunks):
    a = jax.random.normal(jax.random.key(2), (8 * 64, 6))
    g = jax.random.normal(jax.random.key(3), (8 * 64, 10))
    assert _rel_err(conv_ops.rows_weight_grad(a, g), a.T @ g) < FP32_RTOL


def test_conv3x3_params_identical_between_impls():
    x = jnp.ones((1, 8, 8, 3))
    trees = {
        impl: conv_ops.Conv3x3(4, impl=impl).init(jax.random.key(0), x)
        for impl in ("xla", "fast", "auto")
    }
    # The tree nn.Conv(4, (3, 3), use_bias=False) makes inside Conv3x3, as before 'fast'.
    expected = {"params": {"Conv_0": {"kernel": (3, 3, 3, 4)}}}
    for tree in trees.values():
        assert jax.tree.map(jnp.shape, tree) == expected
        # Exact: the same initializer call (key, shape) in every impl; no kernel arithmetic.
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(trees["xla"]), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("impl", ["xla", "fast"])
def test_conv_transpose_is_nn_conv_transpose(impl, small_chunks):
    x = jax.random.normal(jax.random.key(4), (2, 8, 6, 5))
    ref = nn.ConvTranspose(6, (2, 2), strides=(2, 2))
    mod = conv_ops.ConvTranspose(6, impl=impl)
    variables = ref.init(jax.random.key(5), x)
    mine = mod.init(jax.random.key(5), x)
    assert jax.tree.structure(mine) == jax.tree.structure(variables)
    # Exact: the same initializers on the same keys and shapes (the outputs below: a tolerance).
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)
    # A non-zero bias, so that its gradient path is exercised too.
    variables = jax.tree.map(lambda v: v + 0.1, variables)

    def loss(module, v, x):
        return (module.apply(v, x) ** 2).sum()

    y_ref, y = ref.apply(variables, x), mod.apply(variables, x)
    assert y.shape == (2, 16, 12, 6)
    assert _rel_err(y, y_ref) < FP32_RTOL
    g_ref = jax.grad(loss, argnums=(1, 2))(ref, variables, x)
    g = jax.grad(loss, argnums=(1, 2))(mod, variables, x)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        assert _rel_err(a, b) < FP32_RTOL


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_max_pool_fast_is_nn_max_pool_with_ties(dtype):
    """Same values and bit-identical gradient, ties included: a ReLU output is mostly zeros,
    so whole windows tie, and the gradient must go to the first maximum as in XLA. Exact across
    the two kernels on any CPU: a maximum selects an input and the gradient of non-overlapping
    windows places a cotangent, neither rounds."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.maximum(rng.integers(-2, 3, (2, 6, 8, 5)), 0), dtype)
    weights = jnp.asarray(rng.standard_normal((2, 3, 4, 5)), dtype)

    def loss(pool, x):
        return (pool(x).astype(jnp.float32) * weights).sum()

    def ref_pool(x):
        return nn.max_pool(x, (2, 2), strides=(2, 2))

    def fast_pool(x):
        return conv_ops.max_pool2x2(x, impl="fast")

    np.testing.assert_array_equal(jax.jit(fast_pool)(x), jax.jit(ref_pool)(x))
    g_ref = jax.jit(jax.grad(lambda x: loss(ref_pool, x)))(x)
    g = jax.jit(jax.grad(lambda x: loss(fast_pool, x)))(x)
    assert float((x == 0).mean()) > 0.5  # many tied windows
    np.testing.assert_array_equal(g, g_ref)
    assert conv_ops.max_pool2x2(x, impl="xla").shape == (2, 3, 4, 5)
    with pytest.raises(NotImplementedError, match="even H and W"):
        conv_ops.max_pool2x2(x[:, :5], impl="fast")


def test_unet_train_step_same_with_either_impl(small_chunks, plan):
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 2, (2, 16, 16)), jnp.int32)
    models = {
        impl: UNet(num_classes=2, widths=(4, 8, 16), conv_impl=impl) for impl in conv_ops.IMPLS
    }
    variables = models["xla"].init(jax.random.key(0), images, train=False)
    fast_variables = models["fast"].init(jax.random.key(0), images, train=False)
    assert jax.tree.structure(fast_variables) == jax.tree.structure(variables)
    tx = optax.adam(1e-3)

    def step(model, variables):
        def loss_fn(params):
            out, updates = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(out["logits"], labels)
            return loss.mean(), updates["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, _ = tx.update(grads, tx.init(variables["params"]), variables["params"])
        return loss, grads, stats, optax.apply_updates(variables["params"], updates)

    ref = jax.jit(lambda v: step(models["xla"], v))(variables)
    fast = _fast_jit(lambda v: step(models["fast"], v))(variables)
    assert abs(float(fast[0]) - float(ref[0])) <= FP32_RTOL * abs(float(ref[0]))
    for tree_fast, tree_ref in zip(fast[1:], ref[1:], strict=True):
        for a, b in zip(jax.tree.leaves(tree_fast), jax.tree.leaves(tree_ref), strict=True):
            assert _rel_err(a, b) < FP32_RTOL


def test_resolve_impl():
    assert conv_ops.resolve_impl("auto") == ("fast" if jax.default_backend() == "cpu" else "xla")
    assert conv_ops.resolve_impl("xla") == "xla"
    assert conv_ops.resolve_impl("fast") == "fast"
    with pytest.raises(ValueError, match="Unknown conv implementation"):
        conv_ops.resolve_impl("cudnn")


def test_cpu_plan_choice_and_errors(monkeypatch):
    monkeypatch.setattr(conv_ops, "_cpu_plan", None)
    monkeypatch.setenv("PUSEG_CPU_CONV_PLAN", "eigen")
    assert conv_ops.cpu_plan() == "eigen"
    options = conv_ops.compiler_options("fast")
    assert options == {"xla_cpu_experimental_ynn_fusion_type": conv_ops._YNN_FUSIONS["eigen"]}
    assert conv_ops.compiler_options("xla") is None
    # XLA accepts the option (a wrong name or value would fail here, at compilation).
    assert float(jax.jit(lambda x: x * 2, compiler_options=options)(1.0)) == 2.0
    monkeypatch.setattr(conv_ops, "_cpu_plan", None)
    monkeypatch.setenv("PUSEG_CPU_CONV_PLAN", "im2col")
    assert conv_ops.cpu_plan() == "im2col" and conv_ops.compiler_options("fast") is None
    monkeypatch.setattr(conv_ops, "_cpu_plan", None)
    monkeypatch.delenv("PUSEG_CPU_CONV_PLAN")
    native = native_conv.available()
    assert conv_ops.cpu_plan() == conv_ops.auto_plan(*conv_ops._cpu_info(), native=native)
    # The rule per CPU kind (the vendor and flags of the machines measured).
    assert conv_ops.auto_plan("AuthenticAMD", {"avx2", "fma"}) == "im2col"  # EPYC Zen 3
    assert conv_ops.auto_plan("AuthenticAMD", {"avx2", "fma"}, native=True) == "im2col"
    assert conv_ops.auto_plan("AuthenticAMD", {"avx2", "avx512f"}) == "eigen_reduce"  # Zen 4
    assert conv_ops.auto_plan("AuthenticAMD", {"avx2", "avx512f"}, native=True) == "native"
    assert conv_ops.auto_plan("GenuineIntel", {"avx2", "avx512f", "amx_tile"}) == "eigen"
    assert conv_ops.auto_plan("GenuineIntel", {"avx512f"}, native=True) == "eigen"
    assert conv_ops.auto_plan("", set()) == "im2col"
    # 'eigen_reduce' leaves only the reductions on YNNPACK, and XLA accepts that value too.
    monkeypatch.setattr(conv_ops, "_cpu_plan", None)
    monkeypatch.setenv("PUSEG_CPU_CONV_PLAN", "eigen_reduce")
    options = conv_ops.compiler_options("fast")
    assert options == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
    assert float(jax.jit(lambda x: x * 2, compiler_options=options)(1.0)) == 2.0
    monkeypatch.delenv("PUSEG_CPU_CONV_PLAN")
    monkeypatch.setattr(conv_ops, "_cpu_plan", None)
    monkeypatch.setenv("PUSEG_CPU_CONV_PLAN", "mkl")
    with pytest.raises(ValueError, match="PUSEG_CPU_CONV_PLAN='mkl'"):
        conv_ops.cpu_plan()
    with pytest.raises(ValueError, match="Unknown CPU plan"):
        conv_ops.set_cpu_plan("mkl")


def test_fast_rejects_other_convolutions():
    x = jnp.ones((1, 8, 8, 3))
    with pytest.raises(NotImplementedError):
        nn.Conv(4, (3, 3), strides=2, conv_general_dilated=conv_ops.fast_conv_general_dilated).init(
            jax.random.key(0), x
        )
    with pytest.raises(NotImplementedError):
        nn.Conv(4, (5, 5), conv_general_dilated=conv_ops.fast_conv_general_dilated).init(
            jax.random.key(0), x
        )


def test_weight_grad_benchmark_formulations_agree(capsys):
    """benchmarks/bench_weight_grad.py: each formulation it times gives XLA's weight gradient
    (the script stops on a relative error over 1e-4), including multi-band scans."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import bench_weight_grad

    variants = [v for v in bench_weight_grad.VARIANTS if v != "torch"] + ["im2col/64"]
    bench_weight_grad.main(
        ["--layers", "2x8x8x3x5", "2x16x16x4x2", "--reps", "1", "--variants", *variants]
    )
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2x")]
    assert len(rows) == 2 and all(row.count("|") == len(variants) + 2 for row in rows)
    # cols3_scan/16 needs the height to be a multiple of 16: skipped ('-') at 8, run at 16.
    assert rows[0].split("|")[1 + variants.index("cols3_scan/16") + 1].strip() == "-"
    assert rows[1].split("|")[1 + variants.index("cols3_scan/16") + 1].strip() != "-"


def test_forward_benchmark_variants_agree(capsys):
    """benchmarks/bench_conv_forward.py: what it times is XLA's convolution (the script stops
    on a relative error over 1e-4 against Eigen's)."""
    import os
    import sys

    _require_native()
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import bench_conv_forward

    variants = ["eigen", "ynn", "winograd"]
    bench_conv_forward.main(["--layers", "2x9x8x16x32", "--reps", "1", "--variants", *variants])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2x")]
    assert len(rows) == 1 and rows[0].count("|") == len(variants) + 2


@pytest.mark.parametrize(
    "shape",
    [
        (2, 8, 8, 3, 32),  # first-layer-like: fewer input channels than a block
        (1, 9, 7, 13, 40),  # odd sizes; C past one block, K not a multiple of the vector block
        (3, 5, 300, 2, 64),  # rows wider than the 256-pixel chunk
        (2, 4, 4, 25, 17),  # several rows a chunk, K below one block (the scalar path only)
        (1, 6, 6, 32, 32),  # 32 channels: blocks of 12, 12 and 8 (AVX-512) or 6 x 5 + 2
        (2, 6, 5, 31, 32),  # 31: 12 + 12 + 4 + 2 + 1, every remainder block
        (1, 5, 7, 9, 16),  # 16 output channels: one AVX-512 vector (two AVX2 ones)
        (1, 4, 6, 3, 56),  # 56 = 32 + 16 + 8: both vector blocks and the scalar rest
    ],
)
def test_native_weight_grad_is_xlas(shape):
    _require_native()
    n, h, w, c, k = shape
    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((n, h, w, k)), jnp.float32)
    _, vjp = jax.vjp(lambda kernel: conv_ops._conv_same(x, kernel), jnp.zeros((3, 3, c, k)))
    ref = vjp(g)[0]
    got = jax.jit(native_conv.conv3x3_weight_grad)(x, g)
    assert got.shape == ref.shape and got.dtype == jnp.float32
    assert _rel_err(got, ref) < FP32_RTOL
    # Every tap is checked: a swapped or shifted offset would fail this (the border rows and
    # columns make the nine taps differ).
    for i in range(3):
        for j in range(3):
            assert _rel_err(got[i, j], ref[i, j]) < FP32_RTOL, (i, j)
    with pytest.raises(TypeError, match="float32"):
        native_conv.conv3x3_weight_grad(x.astype(jnp.bfloat16), g)


def test_native_weight_grad_of_an_empty_batch_is_zero():
    _require_native()
    got = native_conv.conv3x3_weight_grad(jnp.ones((0, 4, 4, 3)), jnp.ones((0, 4, 4, 5)))
    assert got.shape == (3, 3, 3, 5) and not np.asarray(got).any()


def test_native_plan_runs_only_the_large_layers():
    _require_native()
    conv_ops.set_cpu_plan("native")
    try:

        def grad_jaxpr(size, in_channels=2, out_channels=16, batch=1):
            x = jax.ShapeDtypeStruct((batch, size, size, in_channels), jnp.float32)
            kernel = jax.ShapeDtypeStruct((3, 3, in_channels, out_channels), jnp.float32)

            def loss(x, kernel):
                return conv_ops.conv3x3_fast(x, kernel).sum()

            return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, kernel))

        side = int(conv_ops._NATIVE_MIN_PIXELS**0.5)
        assert native_conv.TARGET in grad_jaxpr(side)
        assert native_conv.TARGET not in grad_jaxpr(side // 2)
        assert native_conv.TARGET not in grad_jaxpr(side, out_channels=8)
        # Winograd: forward and input gradient, two calls, from its size and work on, channels
        # in multiples of 16 only.
        side = int(conv_ops._WINOGRAD_MIN_PIXELS**0.5)
        batch = -(-conv_ops._WINOGRAD_MIN_WORK // (side * side * 16 * 32))
        assert grad_jaxpr(side, 16, 32, batch).count(native_conv.WINOGRAD_TARGET) == 2
        assert native_conv.WINOGRAD_TARGET not in grad_jaxpr(side, 16, 32, batch - 1)
        assert native_conv.WINOGRAD_TARGET not in grad_jaxpr(side - 1, 16, 32, 2 * batch)
        assert native_conv.WINOGRAD_TARGET not in grad_jaxpr(side, 8, 32, 2 * batch)
        assert native_conv.WINOGRAD_TARGET not in grad_jaxpr(side, 16, 24, 2 * batch)
    finally:
        conv_ops.set_cpu_plan(None)


@pytest.mark.parametrize(
    "shape",
    [
        (2, 7, 9, 16, 32),  # odd sizes: the last tiles of a column and a row are half outside
        (1, 1, 1, 32, 16),  # one pixel: every input of its tile but one is padding
        (1, 2, 3, 16, 48),  # K = 48: a block of two vectors and one of one (AVX-512)
        (2, 41, 38, 48, 16),  # ~800 tiles: many chunks, blocks of every size at a chunk's end
        (3, 6, 4, 64, 64),
    ],
)
def test_native_winograd_is_xlas(shape):
    _require_native()
    n, h, w, c, k = shape
    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, c, k)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((n, h, w, k)), jnp.float32)
    y, vjp = jax.vjp(lambda x_: conv_ops._conv_same(x_, kernel), x)
    (dx,) = vjp(g)
    got_y = jax.jit(native_conv.conv3x3)(x, kernel)
    got_dx = jax.jit(native_conv.conv3x3_input_grad)(g, kernel)
    assert got_y.shape == y.shape and got_dx.shape == dx.shape
    assert _rel_err(got_y, y) < FP32_RTOL and _rel_err(got_dx, dx) < FP32_RTOL
    # Pixel by pixel, relative to the pixel's own scale: a wrong border or a misplaced output
    # of a tile fails here even where the maximum error above would hide it.
    scale = np.abs(np.asarray(y)).max(axis=-1, keepdims=True) + 1e-3
    assert (np.abs(np.asarray(got_y) - np.asarray(y)) / scale).max() < FP32_RTOL * 10


def test_native_winograd_rejects_what_it_cannot_take():
    _require_native()
    x = jnp.ones((1, 4, 4, 16))
    with pytest.raises(ValueError, match="multiples of 16"):
        native_conv.conv3x3(x, jnp.ones((3, 3, 16, 8)))
    with pytest.raises(TypeError, match="float32"):
        native_conv.conv3x3(x.astype(jnp.bfloat16), jnp.ones((3, 3, 16, 16)))
    empty = native_conv.conv3x3(jnp.ones((0, 4, 4, 16)), jnp.ones((3, 3, 16, 32)))
    assert empty.shape == (0, 4, 4, 32)


def test_native_winograd_under_shard_map_on_8_devices():
    _require_native()
    from jax.sharding import Mesh, PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("batch",))
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((8, 10, 12, 16)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 16, 32)), jnp.float32)
    spec = PartitionSpec("batch")
    sharded = jax.jit(
        jax.shard_map(
            native_conv.conv3x3, mesh=mesh, in_specs=(spec, PartitionSpec()), out_specs=spec
        )
    )(x, kernel)
    assert _rel_err(sharded, conv_ops._conv_same(x, kernel)) < FP32_RTOL


def test_native_weight_grad_under_shard_map_on_8_devices():
    """Each device runs the kernel on its shard; the psum of the shards is the whole sum."""
    _require_native()
    from jax.sharding import Mesh, PartitionSpec

    devices = jax.devices()
    assert len(devices) == 8
    mesh = Mesh(np.array(devices), ("batch",))
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((8, 12, 20, 5)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((8, 12, 20, 6)), jnp.float32)

    def per_device(x, g):
        return jax.lax.psum(native_conv.conv3x3_weight_grad(x, g), "batch")

    spec = PartitionSpec("batch")
    sharded = jax.jit(
        jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec), out_specs=PartitionSpec())
    )(x, g)
    whole = native_conv.conv3x3_weight_grad(x, g)
    assert _rel_err(sharded, whole) < FP32_RTOL


def test_native_unavailable_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(native_conv, "_state", {})
    monkeypatch.setenv("PUSEG_NATIVE", "0")
    assert not native_conv.available()
    assert "PUSEG_NATIVE=0" in native_conv.unavailable_reason()
    with pytest.raises(RuntimeError, match="unavailable"):
        native_conv.conv3x3_weight_grad(jnp.ones((1, 4, 4, 1)), jnp.ones((1, 4, 4, 1)))
    monkeypatch.setattr(conv_ops, "_cpu_plan", None)
    with pytest.raises(ValueError, match="PUSEG_NATIVE=0"):
        conv_ops.set_cpu_plan("native")
    # The automatic choice falls back to the plan measured without it.
    vendor, flags = conv_ops._cpu_info()
    assert conv_ops.cpu_plan() == conv_ops.auto_plan(vendor, flags, native=False) != "native"
    monkeypatch.setattr(conv_ops, "_cpu_plan", None)
    # A compiler that fails: the build's error is the reason.
    monkeypatch.setattr(native_conv, "_state", {})
    monkeypatch.delenv("PUSEG_NATIVE")
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv("PUSEG_NATIVE_CACHE", str(tmp_path))
    assert not native_conv.available()
    assert "build or load failed" in native_conv.unavailable_reason()
    monkeypatch.setattr(native_conv, "_state", {})
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert not native_conv.available()
    assert "no C++ compiler" in native_conv.unavailable_reason()
