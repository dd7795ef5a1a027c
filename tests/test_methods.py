"""Every method trains through the real train step without NaN (a few steps, every run) and
overfits a fixed batch (120 steps, marked slow)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_builders.synthetic import generator
from puseg_jax import metrics, parallel
from puseg_jax.core.datasets import get_dataset_info
from puseg_jax.data import transforms
from puseg_jax.model import losses
from puseg_jax.train import config as train_config
from puseg_jax.train import steps
from tests.conftest import test_config as make_config

# 120 steps: every method fits the batch to Dice >= 0.99 (60 left OC at 0.73-0.98, by seed), so
# the thresholds below leave a wide margin for another CPU's rounding.
SIZE, STEPS, WIDTHS = 32, 120, (8, 16, 32)
# The quick check: a two-level U-Net at 16x16 compiles in a fraction of the time.
QUICK_STEPS, QUICK_WIDTHS = 12, (4, 8)


@pytest.fixture(scope="module")
def fixed_batch():
    """Eight synthetic fundus images (two domains) at 32x32, normalised as the pipeline does."""
    images, masks = [], []
    for i in range(8):
        image, mask = generator.generate_fundus((5, i), ("Domain1", "Domain3")[i % 2], SIZE)
        shift, scale = transforms.normalization_stats(image, "zscore")
        images.append((image.astype(np.float32) * np.float32(1 / 255) - shift) / scale)
        masks.append(mask.astype(np.int32))
    return {"image": np.stack(images), "mask": np.stack(masks)}


def _initial_state(config, info, model, x):
    """A TrainState with He-normal weights drawn by NumPy from the shapes of `model.init`.

    The initialisers themselves run in the end-to-end training tests; compiling them here for
    both architectures would only add time.
    """
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(config.seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), leaf.shape), leaf.dtype)
        one = "scale" in name or name.endswith("['var']")
        return jnp.ones(leaf.shape, leaf.dtype) if one else jnp.zeros(leaf.shape, leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    return steps.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=steps.create_optimizer(config),
    )


@functools.cache
def _predict(model):
    """Evaluation-mode forward pass, compiled once per architecture (Linen modules hash)."""
    return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def _train(method, batch, num_steps, size, widths):
    """`num_steps` steps of the real train step on one fixed batch: (model, state, metrics)."""
    config = make_config(
        method=method,
        num_train_steps=num_steps,
        **{
            "optim.learning_rate": 1e-2,
            "data.image_size": size,
            "model.widths": widths,
            # The method is under test here, not the convolution: XLA's own compiles fastest.
            "model.conv_impl": "xla",
        },
    )
    info = get_dataset_info(config.data.name)
    model = steps.create_model(config, info)
    state = _initial_state(config, info, model, jnp.asarray(batch["image"][:1]))
    mesh = parallel.create_mesh(1)
    step = parallel.wrap_train_step(
        functools.partial(steps.train_step, config=config, label_mode=info.label_mode), mesh, "jit"
    )
    state = parallel.replicate(state, mesh, "jit")
    sharded = parallel.shard_batch(batch, mesh, "jit")
    history = []
    for _ in range(num_steps):
        state, m = step(state, sharded, jax.random.key(0))
        history.append(jax.device_get(m))
    assert all(bool(m["finite_loss"]) and bool(m["finite_grads"]) for m in history), method
    return model, state, history


def _mean_loss(history) -> float:
    return float(np.mean([float(m["loss"]) for m in history]))


@pytest.mark.parametrize("method", losses.METHODS)
def test_method_trains_without_nan(method, fixed_batch):
    # Every run of the suite: each method's loss, gradients and update through the real step.
    small = {k: v[:, ::2, ::2] for k, v in fixed_batch.items()}  # 16x16
    _, _, history = _train(method, small, QUICK_STEPS, SIZE // 2, QUICK_WIDTHS)
    # Averages of 4 steps: robust to one noisy step (the sampled logits, the ramp of lambda).
    assert _mean_loss(history[-4:]) < _mean_loss(history[:4]), method
    assert all(float(m["grad_norm"]) > 0 for m in history)
    if method in losses.UNCERTAINTY_HEAD_METHODS:
        assert all(np.isfinite(float(m["loss_unc"])) for m in history)


# Slow: 7 methods x 120 steps of a three-level U-Net at 32x32, 65 s on the 2-core EPYC at load
# ~4 (the quick test above: 29 s for all 7, and it runs on every run).
@pytest.mark.slow
@pytest.mark.parametrize("method", losses.METHODS)
def test_method_trains_without_nan_and_overfits(method, fixed_batch):
    model, state, history = _train(method, fixed_batch, STEPS, SIZE, WIDTHS)
    first, last = _mean_loss(history[:10]), _mean_loss(history[-10:])
    assert last < 0.6 * first, (method, first, last)
    if method in ("ours", "ours_no_highlight", "entropy"):
        assert 0.0 < float(history[-1]["mean_u"]) < 1.0
        expected_w = 1.0 if method == "ours_no_highlight" else 1.0 + float(history[-1]["mean_u"])
        assert float(history[-1]["mean_w"]) == pytest.approx(expected_w, rel=1e-5)

    # The fitted batch, predicted in evaluation mode (BatchNorm running statistics) from mu.
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    out = _predict(model)(variables, fixed_batch["image"])
    probs = np.asarray(jax.nn.sigmoid(out["logits"]))
    mask = fixed_batch["mask"]
    dice_od = metrics.compute_dice(probs[..., 0] > 0.5, mask >= 1)
    dice_oc = metrics.compute_dice(probs[..., 1] > 0.5, mask >= 2)
    assert dice_od > 0.95 and dice_oc > 0.9, (method, dice_od, dice_oc)


def test_mc_dropout_passes_do_not_touch_batch_stats(fixed_batch):
    """The MC-dropout passes of `loss.uncertainty_source='mc_dropout'` run BatchNorm on the batch
    but their statistics are discarded: the step's new batch_stats are those of the training
    pass alone, i.e. those of the same step with U from the logit samples."""
    common = {
        "method": "ours",
        "data.image_size": SIZE,
        "model.widths": WIDTHS,
        "model.conv_impl": "xla",
        "model.dropout_rate": 0.2,
        "loss.ramp_fraction": 0.0,
    }
    results = {}
    for source in ("entropy", "mc_dropout"):
        config = make_config(**common, **{"loss.uncertainty_source": source})
        info = train_config.validate_config(config)
        model = steps.create_model(config, info)
        state = _initial_state(config, info, model, jnp.asarray(fixed_batch["image"][:1]))
        initial = jax.device_get(state.batch_stats)  # the step donates the state
        mesh = parallel.create_mesh(1)
        step = parallel.wrap_train_step(
            functools.partial(steps.train_step, config=config, label_mode=info.label_mode),
            mesh,
            "jit",
        )
        new, m = step(
            parallel.replicate(state, mesh, "jit"),
            parallel.shard_batch(fixed_batch, mesh, "jit"),
            jax.random.key(0),
        )
        results[source] = (jax.device_get(new.batch_stats), jax.device_get(m))
    (stats_e, m_e), (stats_mc, m_mc) = results["entropy"], results["mc_dropout"]
    # U (and so the loss) came from other passes, the BatchNorm statistics did not.
    assert float(m_mc["mean_u"]) != float(m_e["mean_u"])
    assert float(m_mc["loss"]) != float(m_e["loss"])
    for a, b, c in zip(
        jax.tree.leaves(stats_mc), jax.tree.leaves(stats_e), jax.tree.leaves(initial), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        assert not np.allclose(a, c)  # the training pass did update them
    with pytest.raises(ValueError, match="needs model.dropout_rate > 0"):
        train_config.validate_config(
            make_config(
                **{**common, "model.dropout_rate": 0.0, "loss.uncertainty_source": "mc_dropout"}
            )
        )
