"""The U-Net: output heads, pinned parameter counts, norms, dropout (MC and deterministic)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from puseg_jax.model import unet

TEST_WIDTHS = (4, 8, 16)


def _shapes(model, size=32, channels=3, train=False):
    x = jnp.zeros((2, size, size, channels))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    out = jax.eval_shape(
        lambda v: model.apply(v, x, train=train, mutable=["batch_stats"] if train else False),
        variables,
    )
    return variables, out


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _count_by_hand(widths, in_channels, num_classes, logvar_channels) -> int:
    """Two 3x3 convs (no bias) + BatchNorm (scale, bias) per block; 2x2 transposed convs with
    bias; decoder blocks read the skip and the up-sampled maps (2 x width); 1x1 heads."""

    def block(cin, c):
        return 9 * cin * c + 2 * c + 9 * c * c + 2 * c

    n, cin = 0, in_channels
    for c in widths:
        n += block(cin, c)
        cin = c
    for c in reversed(widths[:-1]):
        n += 4 * cin * c + c + block(2 * c, c)
        cin = c
    return n + widths[0] * num_classes + num_classes + (widths[0] + 1) * logvar_channels


@pytest.mark.parametrize(
    "config_name, arg, method, params, stats",
    [
        ("fundus", "Domain1", None, 7_763_140, 5_888),
        ("fundus", "Domain1", "erm", 7_763_074, 5_888),  # no log-variance head
        ("fundus", "Domain1,cpu", None, 1_942_628, 2_944),
        ("prostate", "BIDMC", None, 7_763_140, 5_888),  # 2.5-D: 3 slices as channels
        ("prostate", "BIDMC,cpu", None, 1_942_628, 2_944),
        ("demo", None, None, 486_580, 1_472),
        ("test", None, None, 7_564, 160),
    ],
)
def test_parameter_count_is_pinned(config_name, arg, method, params, stats):
    # The models the configs build (as the trainer does): a change of architecture, width,
    # head or input channels of a shipped config changes a pinned number.
    import importlib

    from puseg_jax.core.datasets import get_dataset_info
    from puseg_jax.model import losses
    from puseg_jax.train import steps

    module = importlib.import_module(f"configs.{config_name}")
    config = module.get_config(arg) if arg else module.get_config()
    if method:
        config.method = method
    info = get_dataset_info(config.data.name)
    channels = steps.input_channels(config, info)
    model = steps.create_model(config, info)
    variables, _ = _shapes(model, size=32, channels=channels)
    assert _count(variables["params"]) == params
    # The same number from the architecture's description (docs/method.md).
    widths, logvar = tuple(config.model.widths), losses.num_logvar_channels(config, 2)
    assert params == _count_by_hand(widths, channels, info.num_outputs, logvar)
    # BatchNorm running mean and variance: 2 per channel of every conv, encoder and decoder.
    assert _count(variables["batch_stats"]) == stats == 4 * (sum(widths) + sum(widths[:-1]))


@pytest.mark.parametrize("logvar", [0, 1, 2])
def test_heads_and_shapes(logvar):
    model = unet.UNet(num_classes=2, widths=TEST_WIDTHS, logvar_channels=logvar)
    variables, out = _shapes(model)
    assert out["logits"].shape == (2, 32, 32, 2) and out["logits"].dtype == jnp.float32
    if logvar:
        assert out["log_var"].shape == (2, 32, 32, logvar)
        assert "log_var_head" in variables["params"]
    else:
        assert "log_var" not in out and "log_var_head" not in variables["params"]
    # Encoder: len(widths) blocks; decoder: len(widths) - 1 blocks and transposed convs.
    names = set(variables["params"])
    assert sum(n.startswith("DoubleConv") for n in names) == 2 * len(TEST_WIDTHS) - 1
    assert sum(n.startswith("ConvTranspose") for n in names) == len(TEST_WIDTHS) - 1
    # bfloat16 compute still returns float32 heads (the losses need the precision).
    bf16 = unet.UNet(num_classes=2, widths=TEST_WIDTHS, logvar_channels=1, dtype=jnp.bfloat16)
    _, out = _shapes(bf16)
    assert out["logits"].dtype == out["log_var"].dtype == jnp.float32


def test_group_norm_has_no_batch_stats_and_takes_any_width():
    # Width 12 is not divisible by 8 groups: gcd(8, 12) = 4 groups are used.
    model = unet.UNet(num_classes=2, widths=(12, 24), norm="group")
    variables, out = _shapes(model, size=16)
    assert "batch_stats" not in variables
    assert out["logits"].shape == (2, 16, 16, 2)
    with pytest.raises(ValueError, match="Unknown norm"):
        _shapes(unet.UNet(num_classes=2, widths=TEST_WIDTHS, norm="layer"))


def _params_numpy(model, x, seed=0):
    """Random parameters without compiling the initialisers (shapes from eval_shape)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "var" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        if "mean" in name or "bias" in name:
            return jnp.zeros(leaf.shape, leaf.dtype)
        if "scale" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.normal(0, 1 / np.sqrt(fan_in), leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def test_dropout_is_deterministic_at_evaluation_and_random_for_mc_dropout():
    model = unet.UNet(num_classes=2, widths=TEST_WIDTHS, dropout_rate=0.5, logvar_channels=2)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 16, 3)), jnp.float32)
    variables = _params_numpy(model, x)
    apply = jax.jit(
        lambda v, x, key, mc: model.apply(v, x, train=False, mc_dropout=mc, rngs={"dropout": key}),
        static_argnums=3,
    )
    a = apply(variables, x, jax.random.key(1), False)["logits"]
    b = apply(variables, x, jax.random.key(2), False)["logits"]
    np.testing.assert_array_equal(a, b)
    c = apply(variables, x, jax.random.key(1), True)["logits"]
    d = apply(variables, x, jax.random.key(2), True)["logits"]
    assert not np.allclose(c, d)
    np.testing.assert_array_equal(c, apply(variables, x, jax.random.key(1), True)["logits"])


def test_example_dropout_masks_follow_the_global_example_index(monkeypatch):
    """With `example_ids` an example's dropout masks depend on its index and the key only, so a
    device holding examples 4..7 draws what one device holding 0..7 draws for them."""
    model = unet.UNet(num_classes=2, widths=TEST_WIDTHS, dropout_rate=0.5)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 16, 16, 3)), jnp.float32)
    variables = _params_numpy(model, x)

    def run(x, ids):
        return model.apply(
            variables,
            x,
            train=False,
            mc_dropout=True,
            rngs={"dropout": jax.random.key(3)},
            example_ids=ids,
        )["logits"]

    # The masks themselves, layer by layer (eagerly, so they can be recorded): the real
    # function applied to ones keeps exactly the activations the mask keeps.
    masks = []
    real = unet.example_dropout

    def recording(x, rate, rng, ids):
        masks.append(np.asarray(real(jnp.ones_like(x), rate, rng, ids)) > 0)
        return real(x, rate, rng, ids)

    monkeypatch.setattr(unet, "example_dropout", recording)
    run(x, jnp.arange(8))
    full_masks, masks = masks, []
    run(x[4:], jnp.arange(4, 8))
    assert len(masks) == len(full_masks) == len(TEST_WIDTHS) - 1  # one per decoder block
    for part, full_mask in zip(masks, full_masks, strict=True):
        np.testing.assert_array_equal(part, full_mask[4:])
        assert 0.3 < part.mean() < 0.7  # rate 0.5: neither all kept nor all dropped
    monkeypatch.undo()

    # The logits then agree up to float rounding: XLA may sum in another order for another
    # batch size (2.4e-7 apart on an AVX2 CPU). Another mask moves them by far more than that.
    apply = jax.jit(run)
    full = np.asarray(apply(x, jnp.arange(8)))
    np.testing.assert_allclose(np.asarray(apply(x[4:], jnp.arange(4, 8))), full[4:], atol=1e-5)
    shifted = np.asarray(apply(x[4:], jnp.arange(4)))
    assert np.abs(shifted - full[4:]).max() > 1e-2
    # Masks do differ between examples (same input, different index) and from no dropout.
    same = jnp.repeat(x[:1], 8, 0)
    out = np.asarray(apply(same, jnp.arange(8)))
    assert not np.allclose(out[0], out[1])
    m = unet.example_dropout(jnp.ones((2, 64, 64, 4)), 0.25, jax.random.key(0), jnp.arange(2))
    kept = np.asarray(m) > 0
    assert abs(kept.mean() - 0.75) < 0.02 and np.allclose(np.asarray(m)[kept], 1 / 0.75)
