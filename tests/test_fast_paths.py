"""The faster CPU paths of the `ours` loss compute what the code before them computed.

`losses.sample_noise` (a loop over the examples instead of vmap), `losses.sampled_nll` (a
hand-written gradient, sample by sample) and the slice-wise means over the samples replaced
`vmap`, autodiff through `uncertainty_nll(sample_logits(...))` and `jnp.mean(axis=0)` for speed
(benchmarks/README.md, "Where a run's time goes"). Here the code before is the reference,
written out in the tests: noise, losses, gradients and the uncertainty map must agree to float
rounding (other summation orders), and a real error (a wrong sign, a missing factor 1/2 of
d sigma / d s, a sample left out) moves them far beyond the tolerance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from puseg_jax.model import losses
from tests.conftest import test_config as make_config

B, H, W, T = 2, 6, 6, 10
RTOL, ATOL = 2e-5, 2e-6


def reference_noise(rng, num_samples, example_ids, shape):
    """The code before: vmap over the examples."""

    def one(eid):
        return jax.random.normal(jax.random.fold_in(rng, eid), (num_samples,) + tuple(shape[1:]))

    return jax.vmap(one, out_axes=1)(example_ids)


def reference_nll(mu, log_var, eps, targets, label_mode):
    """The code before: autodiff through the samples and `jax.nn.logsumexp(axis=0)`."""
    z = mu[None] + jnp.exp(0.5 * log_var)[None] * eps
    return losses.uncertainty_nll(z, targets, label_mode)


def _inputs(mode, k, logvar_channels, seed=0, scale=3.0):
    r = np.random.default_rng(seed)
    mu = jnp.asarray(scale * r.standard_normal((B, H, W, k)), jnp.float32)
    log_var = jnp.asarray(r.standard_normal((B, H, W, logvar_channels)) - 1.0, jnp.float32)
    mask = jnp.asarray(r.integers(0, 3, (B, H, W)), jnp.int32)
    targets = losses.targets_from_mask(mask, mode, k)
    return mu, log_var, mask, targets


def test_noise_is_the_vmap_noise():
    rng, ids = jax.random.key(7), jnp.arange(3, 3 + B)
    got = jax.jit(lambda: losses.sample_noise(rng, T, ids, (B, H, W, 2)))()
    want = jax.jit(lambda: reference_noise(rng, T, ids, (B, H, W, 2)))()
    assert got.shape == (T, B, H, W, 2)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    other = jax.jit(lambda: losses.sample_noise(jax.random.key(8), T, ids, (B, H, W, 2)))()
    assert np.max(np.abs(other - want)) > 1.0


@pytest.mark.parametrize(
    "mode,k,logvar_channels", [("sigmoid", 2, 2), ("sigmoid", 2, 1), ("softmax", 3, 3)]
)
@pytest.mark.parametrize("scale", [3.0, 40.0])
def test_sampled_nll_value_and_gradients(mode, k, logvar_channels, scale):
    """scale 40: confident logits, where the likelihoods underflow without the log space."""
    mu, log_var, _, targets = _inputs(mode, k, logvar_channels, scale=scale)
    eps = reference_noise(jax.random.key(1), T, jnp.arange(B), mu.shape)
    g = jnp.asarray(np.random.default_rng(5).uniform(0.5, 2.0, (B, H, W)), jnp.float32)

    def f(nll):
        return jax.jit(
            jax.value_and_grad(
                lambda m, s: jnp.sum(g * nll(m, s, eps, targets, mode)), argnums=(0, 1)
            )
        )(mu, log_var)

    (v, (gm, gs)), (rv, (rgm, rgs)) = f(losses.sampled_nll), f(reference_nll)
    assert np.isfinite(v) and np.all(np.isfinite(gm)) and np.all(np.isfinite(gs))
    np.testing.assert_allclose(v, rv, rtol=RTOL)
    np.testing.assert_allclose(gm, rgm, rtol=RTOL, atol=ATOL * np.max(np.abs(rgm)))
    np.testing.assert_allclose(gs, rgs, rtol=RTOL, atol=ATOL * np.max(np.abs(rgs)))
    assert gs.shape == log_var.shape
    # The gradients are not trivially small: an error of their size would show.
    assert np.max(np.abs(rgm)) > 1e-2 and np.max(np.abs(rgs)) > 1e-4


def test_sampled_nll_per_pixel_matches_and_a_dropped_sample_would_not():
    mu, log_var, _, targets = _inputs("sigmoid", 2, 2)
    eps = reference_noise(jax.random.key(1), T, jnp.arange(B), mu.shape)
    got = jax.jit(losses.sampled_nll, static_argnums=4)(mu, log_var, eps, targets, "sigmoid")
    want = reference_nll(mu, log_var, eps, targets, "sigmoid")
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    fewer = reference_nll(mu, log_var, eps[:-1], targets, "sigmoid")
    assert np.max(np.abs(fewer - want)) > 100 * ATOL


def test_mean_over_samples_is_the_mean():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((T, B, H, W, 2)), jnp.float32)
    np.testing.assert_allclose(
        jax.jit(losses.mean_over_samples)(x), jnp.mean(x, axis=0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        jax.jit(losses.sum_over_samples)(x), jnp.sum(x, axis=0), rtol=1e-5, atol=1e-5
    )


def _reference_loss(monkeypatch, *args):
    """compute_loss with the noise, likelihood term and U of the code before."""

    def reference_u(config, outputs, rng, label_mode, example_ids, eps=None):
        mu = outputs["logits"]
        if eps is None:
            eps = reference_noise(rng, config.loss.num_samples, example_ids, mu.shape)
        z = mu[None] + jnp.exp(0.5 * outputs["log_var"])[None] * eps
        mean = jnp.mean(losses.probabilities(z, label_mode), axis=0)
        return losses.normalized_entropy(mean, label_mode)

    with monkeypatch.context() as m:
        m.setattr(losses, "sample_noise", reference_noise)
        m.setattr(losses, "sampled_nll", reference_nll)
        if args[0].loss.uncertainty_source == "entropy":
            m.setattr(losses, "uncertainty_map", reference_u)
        return _loss_and_grads(*args)


def _loss_and_grads(config, outputs, mask, mode):
    def f(o):
        return losses.compute_loss(
            config, o, mask, jax.random.key(4), jnp.asarray(30), mode, jnp.arange(B)
        )

    (loss, aux), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(outputs)
    return loss, aux, grads


@pytest.mark.parametrize("mode,k", [("sigmoid", 2), ("softmax", 3)])
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"loss.lambda_max": 10.0, "loss.highlight_terms": "ce+unc+dice"},
        {"loss.uncertainty_source": "boundary_oracle", "loss.lambda_max": 10.0},
        {"loss.logvar_head": "shared"},
    ],
    ids=["ours", "lambda10_all_terms", "oracle", "shared_logvar"],
)
def test_ours_loss_and_gradients_are_those_of_before(monkeypatch, mode, k, overrides):
    config = make_config(method="ours", num_train_steps=100, **overrides)
    channels = losses.num_logvar_channels(config, k)
    mu, log_var, mask, _ = _inputs(mode, k, channels, seed=11)
    outputs = {"logits": mu, "log_var": log_var}
    loss, aux, grads = _loss_and_grads(config, outputs, mask, mode)
    rloss, raux, rgrads = _reference_loss(monkeypatch, config, outputs, mask, mode)
    np.testing.assert_allclose(loss, rloss, rtol=RTOL)
    for key in ("loss_unc", "loss_seg", "loss_dice", "mean_u", "mean_w"):
        np.testing.assert_allclose(aux[key], raux[key], rtol=RTOL, atol=ATOL, err_msg=key)
    for key in ("logits", "log_var"):
        scale = float(np.max(np.abs(rgrads[key])))
        assert scale > 1e-4, key
        np.testing.assert_allclose(
            grads[key], rgrads[key], rtol=RTOL, atol=ATOL * scale, err_msg=key
        )
