"""Every loss against a hand-computed NumPy value on small arrays (docs/method.md).

All arrays share one shape so that the eagerly run JAX ops compile once per shape.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from puseg_jax import parallel
from puseg_jax.model import losses
from tests.conftest import test_config as make_config

B, H, W, K = 8, 4, 4, 2
MODES = ("softmax", "sigmoid")


# ---------------------------------------------------------------------------------------------
# NumPy references.


def np_logsumexp(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def np_log_softmax(z):
    return z - np_logsumexp(z, -1)[..., None]


def np_bce(z, y):
    """-[y log sigmoid(z) + (1 - y) log sigmoid(-z)], the stable form."""
    return np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))


def np_targets(mask, mode):
    if mode == "softmax":
        return np.eye(K)[mask]
    return np.stack([mask > k for k in range(K)], -1).astype(np.float64)


def np_log_lik(z, y, mode):
    """log p(y|z): [..., 1] softmax, [..., K] sigmoid."""
    if mode == "softmax":
        return np.sum(y * np_log_softmax(z), -1, keepdims=True)
    return -np_bce(z, y)


def np_probs(z, mode):
    if mode == "softmax":
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    return 1 / (1 + np.exp(-z))


def np_entropy01(p, mode):
    if mode == "softmax":
        return -np.sum(np.where(p > 0, p * np.log(p), 0), -1) / np.log(K)
    h = -(p * np.log(p) + (1 - p) * np.log(1 - p)) / np.log(2)
    return np.max(h, -1)


def np_dice_loss(p, y, mode, eps):
    if mode == "softmax":
        p, y = p[..., 1:], y[..., 1:]
    axes = tuple(range(p.ndim - 1))
    d = (2 * np.sum(p * y, axes) + eps) / (np.sum(p, axes) + np.sum(y, axes) + eps)
    return 1 - np.mean(d)


def _data(mode, seed=0):
    rng = np.random.default_rng(seed)
    mu = rng.normal(0, 2, (B, H, W, K)).astype(np.float32)
    log_var = rng.normal(-1, 1, (B, H, W, K)).astype(np.float32)
    mask = rng.integers(0, K if mode == "softmax" else 3, (B, H, W)).astype(np.int32)
    return mu, log_var, mask


def _mc_probs(mode, seed=2):
    """Stand-in for the mean of 3 MC-dropout passes (steps.train_step computes the real one)."""
    rng = np.random.default_rng(seed)
    return np.mean(np_probs(rng.normal(0, 2, (3, B, H, W, K)), mode), 0).astype(np.float32)


def _outputs(config, mode, mu, log_var):
    outputs = {"logits": jnp.asarray(mu)}
    if config.method in losses.UNCERTAINTY_HEAD_METHODS:
        outputs["log_var"] = jnp.asarray(log_var)
        if config.loss.uncertainty_source == "mc_dropout":
            outputs["mc_probs"] = jnp.asarray(_mc_probs(mode))
    return outputs


def _loss(method, mode, mu, log_var, mask, step=0, rng=None, **overrides):
    config = make_config(method=method, **overrides)
    outputs = _outputs(config, mode, mu, log_var)
    rng = jax.random.key(3) if rng is None else rng
    return losses.compute_loss(
        config, outputs, jnp.asarray(mask), rng, jnp.asarray(step), mode, jnp.arange(mu.shape[0])
    )


# ---------------------------------------------------------------------------------------------
# Building blocks.


def test_targets_from_mask():
    mask = jnp.array([[0, 1, 2]])
    np.testing.assert_array_equal(
        losses.targets_from_mask(mask, "sigmoid", 2)[0], [[0, 0], [1, 0], [1, 1]]
    )
    np.testing.assert_array_equal(
        losses.targets_from_mask(mask[:, :2], "softmax", 2)[0], [[1, 0], [0, 1]]
    )
    with pytest.raises(ValueError, match="label_mode"):
        losses.targets_from_mask(mask, "nope", 2)


@pytest.mark.parametrize("mode", MODES)
def test_cross_entropy_dice_focal_topk_by_hand(mode):
    mu, _, mask = _data(mode)
    y = np_targets(mask, mode)
    t = losses.targets_from_mask(jnp.asarray(mask), mode, K)
    ce_ref = -np.mean(np_log_lik(mu.astype(np.float64), y, mode), -1)
    ce = losses.pixel_cross_entropy(jnp.asarray(mu), t, mode)
    np.testing.assert_allclose(ce, ce_ref, rtol=1e-5, atol=1e-6)

    p = np_probs(mu.astype(np.float64), mode)
    np.testing.assert_allclose(
        losses.soft_dice_loss(jnp.asarray(mu), t, mode, eps=1e-5),
        np_dice_loss(p, y, mode, 1e-5),
        rtol=1e-5,
    )

    log_p = np_log_lik(mu.astype(np.float64), y, mode)
    focal_ref = -np.mean((1 - np.exp(log_p)) ** 2 * log_p, -1)
    np.testing.assert_allclose(
        losses.focal_pixel_loss(jnp.asarray(mu), t, mode, 2.0), focal_ref, rtol=1e-5, atol=1e-6
    )
    # gamma = 0 is plain cross-entropy.
    np.testing.assert_allclose(
        losses.focal_pixel_loss(jnp.asarray(mu), t, mode, 0.0), ce_ref, rtol=1e-5, atol=1e-6
    )

    k = round(0.25 * H * W)
    top_ref = np.sort(ce_ref.reshape(B, -1), -1)[:, -k:]
    total, count = losses.topk_image_loss(jnp.asarray(ce_ref, jnp.float32), 0.25)
    assert float(count) == B * k
    np.testing.assert_allclose(total, top_ref.sum(), rtol=1e-5)


def test_soft_dice_perfect_and_empty():
    mask = np.zeros((B, H, W), np.int32)
    mask[:, 1:3, 1:3] = 2
    t = losses.targets_from_mask(jnp.asarray(mask), "sigmoid", K)
    perfect = jnp.where(t > 0, 30.0, -30.0)
    assert float(losses.soft_dice_loss(perfect, t, "sigmoid")) == pytest.approx(0.0, abs=1e-6)
    # No foreground anywhere and none predicted: the smoothing makes Dice 1, not 0/0.
    t0 = jnp.zeros_like(t)
    assert float(losses.soft_dice_loss(jnp.full(t.shape, -30.0), t0, "sigmoid")) == (
        pytest.approx(0.0, abs=1e-4)
    )


@pytest.mark.parametrize("mode", MODES)
def test_uncertainty_nll_by_hand(mode):
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, (5, B, H, W, K)).astype(np.float32)
    _, _, mask = _data(mode)
    y = np_targets(mask, mode)
    log_p = np_log_lik(z.astype(np.float64), y[None], mode)  # [T, B, H, W, 1 or K]
    # -log((1/T) sum_t p(y|z_t)), per channel for sigmoid, then summed over channels.
    ref = -np.sum(np.log(np.mean(np.exp(log_p), 0)), -1)
    got = losses.uncertainty_nll(
        jnp.asarray(z), losses.targets_from_mask(jnp.asarray(mask), mode, K), mode
    )
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_uncertainty_nll_is_stable_in_log_space():
    # Samples so wrong that p(y|z_t) underflows float32: a naive log(mean(p)) gives inf.
    z = (
        jnp.full((4, 1, 1, 1, 2), 0.0)
        .at[..., 1]
        .set(jnp.array([200.0, 210, 220, 230])[:, None, None, None])
    )
    t = jnp.array([[[[1.0, 0.0]]]])
    got = float(losses.uncertainty_nll(z, t, "softmax")[0, 0, 0])
    ref = -(np_logsumexp(-np.array([200.0, 210, 220, 230]), 0) - np.log(4))
    assert got == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_normalized_entropy(mode):
    mu, _, _ = _data(mode)
    p = np_probs(mu.astype(np.float64), mode)
    u = losses.normalized_entropy(jnp.asarray(p, jnp.float32), mode)
    np.testing.assert_allclose(u, np_entropy01(p, mode), rtol=1e-4, atol=1e-5)
    assert float(u.min()) >= 0 and float(u.max()) <= 1 + 1e-6
    half = jnp.full((1, 1, 1, K), 0.5 if mode == "sigmoid" else 1 / K)
    assert float(losses.normalized_entropy(half, mode)[0, 0, 0]) == pytest.approx(1.0, rel=1e-5)
    sure = jnp.zeros((1, 1, 1, K)).at[..., 0].set(1.0)
    assert float(losses.normalized_entropy(sure, mode)[0, 0, 0]) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_normalized_entropy_of_saturated_probabilities_under_jit(mode):
    """Confident pixels have U = 0, also compiled (XLA may reassociate 1 - p + tiny) and for a
    sample mean that rounds past 1."""
    z = jnp.array([-200.0, -30.0, -17.0, 0.0, 17.0, 30.0, 200.0])
    z = jnp.stack([z, z + 1, z - 1])[:, None, None, :, None]  # [T, 1, 1, 7, 1]
    if mode == "softmax":
        z = jnp.concatenate([z, -z], axis=-1)
    u = jax.jit(lambda z: losses.normalized_entropy(losses.sample_mean_probs(z, mode), mode))(z)
    u = np.asarray(u)[0, 0]
    assert np.all(np.isfinite(u)) and np.all((u >= 0) & (u <= 1)), u
    assert u[3] == pytest.approx(1.0) and np.all(u[[0, 1, 5, 6]] < 1e-9)
    over = jnp.full((1, 1, 1, K), 1.0 + 1e-7 if mode == "sigmoid" else 0.5 + 1e-7)
    assert np.isfinite(
        float(jax.jit(losses.normalized_entropy, static_argnums=1)(over, mode)[0, 0, 0])
    )


def test_sample_logits_distribution_and_device_layout():
    mu, log_var, _ = _data("softmax")
    rng = jax.random.key(7)
    ids = jnp.arange(B)
    # T = 3, the tests' num_samples: the same shapes as in compute_loss, compiled once.
    z = np.asarray(losses.sample_logits(jnp.asarray(mu), jnp.asarray(log_var), rng, 3, ids))
    assert z.shape == (3, B, H, W, K)
    eps = (z - mu) / np.exp(log_var / 2)
    # 768 draws: the mean's standard error is 0.036, the standard deviation's 0.026.
    assert abs(eps.mean()) < 0.15 and abs(eps.std() - 1) < 0.1
    # Each example's noise depends only on its global index: any split of the batch agrees (to
    # float rounding: another batch size is another compiled program; other noise is O(1) off).
    half = losses.sample_logits(
        jnp.asarray(mu[4:]), jnp.asarray(log_var[4:]), rng, 3, jnp.arange(4, 8)
    )
    np.testing.assert_allclose(np.asarray(half), z[:, 4:], rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(half) - z[:, :4]).max() > 0.1
    # A shared (1-channel) log-variance broadcasts over the classes, noise still per class.
    shared = losses.sample_logits(jnp.asarray(mu), jnp.asarray(log_var[..., :1]), rng, 3, ids)
    eps_shared = (np.asarray(shared) - mu) / np.exp(log_var[..., :1] / 2)
    assert not np.allclose(eps_shared[..., 0], eps_shared[..., 1])


def test_highlight_lambda_ramp():
    lam = [float(losses.highlight_lambda(t, 2.0, 100)) for t in (0, 50, 99, 100, 1000)]
    assert lam[0] == pytest.approx(2.0 * np.exp(-5.0))
    assert lam[1] == pytest.approx(2.0 * np.exp(-5.0 * 0.25))
    assert lam[2] == pytest.approx(2.0 * np.exp(-5.0 * 0.01**2), rel=1e-5)
    assert lam[3] == lam[4] == 2.0
    ramp = [float(losses.highlight_lambda(t, 1.0, 100)) for t in range(0, 120, 5)]
    assert all(a <= b for a, b in zip(ramp, ramp[1:], strict=False))
    assert float(losses.highlight_lambda(0, 1.5, 0)) == 1.5
    assert float(losses.highlight_lambda(500, 0.0, 100)) == 0.0


def test_sigma_uncertainty_per_image_minmax():
    _, log_var, _ = _data("softmax")
    u = np.asarray(losses.sigma_uncertainty(jnp.asarray(log_var)))
    sigma = np.exp(log_var / 2).mean(-1)
    lo, hi = sigma.min((1, 2), keepdims=True), sigma.max((1, 2), keepdims=True)
    np.testing.assert_allclose(u, (sigma - lo) / (hi - lo), rtol=1e-5, atol=1e-6)
    flat = losses.sigma_uncertainty(jnp.zeros((B, H, W, 1)))
    np.testing.assert_array_equal(flat, 0.0)


# ---------------------------------------------------------------------------------------------
# The full losses of every method.


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("source", ["entropy", "sigma"])
def test_ours_by_hand(mode, source):
    mu, log_var, mask = _data(mode)
    step, rng, cfg = 30, jax.random.key(5), make_config()
    t_r = cfg.loss.ramp_fraction * 400
    total, aux = _loss(
        "ours",
        mode,
        mu,
        log_var,
        mask,
        step=step,
        rng=rng,
        num_train_steps=400,
        **{"loss.uncertainty_source": source, "loss.alpha": 0.7, "loss.lambda_max": 1.5},
    )
    z = np.asarray(
        losses.sample_logits(
            jnp.asarray(mu), jnp.asarray(log_var), rng, cfg.loss.num_samples, jnp.arange(B)
        ),
        np.float64,
    )
    y = np_targets(mask, mode)
    mu64 = mu.astype(np.float64)
    unc = np.mean(-np.sum(np.log(np.mean(np.exp(np_log_lik(z, y[None], mode)), 0)), -1))
    if source == "entropy":
        u = np_entropy01(np.mean(np_probs(z, mode), 0), mode)
    else:
        sig = np.exp(log_var.astype(np.float64) / 2).mean(-1)
        lo, hi = sig.min((1, 2), keepdims=True), sig.max((1, 2), keepdims=True)
        u = (sig - lo) / (hi - lo)
    lam = 1.5 * np.exp(-5 * (1 - step / t_r) ** 2) if step < t_r else 1.5
    w = 1 + lam * u
    ce = -np.mean(np_log_lik(mu64, y, mode), -1)
    hl = np.sum(w * ce) / np.sum(w)
    dice = np_dice_loss(np_probs(mu64, mode), y, mode, cfg.loss.dice_eps)
    np.testing.assert_allclose(aux["loss_unc"], unc, rtol=1e-5)
    np.testing.assert_allclose(aux["mean_u"], u.mean(), rtol=1e-4)
    np.testing.assert_allclose(aux["mean_w"], w.mean(), rtol=1e-5)
    np.testing.assert_allclose(aux["lam"], lam, rtol=1e-5)
    np.testing.assert_allclose(aux["loss_seg"], hl, rtol=1e-5)
    np.testing.assert_allclose(aux["loss_dice"], dice, rtol=1e-5)
    np.testing.assert_allclose(total, hl + dice + 0.7 * unc, rtol=1e-5)


# The variants of the highlighting (docs/method.md), as overrides of configs/test.py's `ours`.
DROPOUT = {"model.dropout_rate": 0.2}
VARIANTS = {
    "today": {},
    "lambda_10": {"loss.lambda_max": 10.0},
    "ce+unc": {"loss.highlight_terms": "ce+unc"},
    "ce+unc+dice": {"loss.highlight_terms": "ce+unc+dice"},
    "mean": {"loss.highlight_norm": "mean"},
    "sigma": {"loss.uncertainty_source": "sigma"},
    "mc_dropout": {"loss.uncertainty_source": "mc_dropout", **DROPOUT},
    "top_q": {"loss.highlight_top_q": 0.25},
    "all": {
        "loss.lambda_max": 3.0,
        "loss.highlight_terms": "ce+unc+dice",
        "loss.highlight_norm": "mean",
        "loss.uncertainty_source": "mc_dropout",
        "loss.highlight_top_q": 0.3,
        **DROPOUT,
    },
    "sigma_ce+unc_top_q": {
        "loss.uncertainty_source": "sigma",
        "loss.highlight_terms": "ce+unc",
        "loss.highlight_top_q": 0.5,
    },
}


def np_top_q(u, q):
    """1 on the round(q H W) largest U of each image; ties go to the lower row-major index."""
    flat = u.reshape(u.shape[0], -1)
    k = max(1, round(q * flat.shape[1]))
    order = np.argsort(-flat, axis=1, kind="stable")
    # The reference's float64 U must rank like the loss's float32 U: no near-tie at the cut.
    ranked = np.take_along_axis(flat, order, 1)
    if k < flat.shape[1]:
        assert np.all(ranked[:, k - 1] - ranked[:, k] > 1e-5), "near-tie at the top-q cut"
    sel = np.zeros_like(flat)
    np.put_along_axis(sel, order[:, :k], 1.0, 1)
    return sel.reshape(u.shape)


def np_weighted_dice_loss(p, y, w, mode, eps):
    if mode == "softmax":
        p, y = p[..., 1:], y[..., 1:]
    w = w[..., None]
    axes = tuple(range(p.ndim - 1))
    d = (2 * np.sum(w * p * y, axes) + eps) / (np.sum(w * p, axes) + np.sum(w * y, axes) + eps)
    return 1 - np.mean(d)


def np_ours(config, mode, mu, log_var, mask, z, mc_probs, lam):
    """Every term of `ours` under the variant fields of `config.loss`, in float64."""
    lc = config.loss
    y = np_targets(mask, mode)
    mu64 = mu.astype(np.float64)
    ce = -np.mean(np_log_lik(mu64, y, mode), -1)
    nll = -np.sum(np.log(np.mean(np.exp(np_log_lik(z, y[None], mode)), 0)), -1)
    if lc.uncertainty_source == "entropy":
        u = np_entropy01(np.mean(np_probs(z, mode), 0), mode)
    elif lc.uncertainty_source == "sigma":
        sig = np.exp(log_var.astype(np.float64) / 2).mean(-1)
        lo, hi = sig.min((1, 2), keepdims=True), sig.max((1, 2), keepdims=True)
        u = (sig - lo) / (hi - lo)
    else:
        u = np_entropy01(mc_probs.astype(np.float64), mode)
    sel = np_top_q(u, lc.highlight_top_q) if lc.highlight_top_q > 0 else np.ones_like(u)
    w = 1 + lam * sel * u

    def reduce(x, weighted):
        if not weighted:
            return x.mean()
        if lc.highlight_norm == "weighted_mean":
            return np.sum(w * x) / np.sum(w)
        return np.mean(w * x)

    p = np_probs(mu64, mode)
    if lc.highlight_terms == "ce+unc+dice":
        dice = np_weighted_dice_loss(p, y, w, mode, lc.dice_eps)
    else:
        dice = np_dice_loss(p, y, mode, lc.dice_eps)
    seg = reduce(ce, True)
    unc = reduce(nll, lc.highlight_terms != "ce")
    return dict(
        loss_seg=seg,
        loss_unc=unc,
        loss_dice=dice,
        loss=seg + lc.dice_weight * dice + lc.alpha * unc,
        mean_u=u.mean(),
        mean_w=w.mean(),
        hl_ratio=seg / ce.mean(),
        hl_fraction=sel.mean(),
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ours_variants_by_hand(mode, variant):
    mu, log_var, mask = _data(mode)
    step, rng = 30, jax.random.key(5)
    overrides = {"num_train_steps": 400, "loss.alpha": 0.7, "loss.lambda_max": 1.5}
    overrides.update(VARIANTS[variant])
    config = make_config(method="ours", **overrides)
    total, aux = _loss("ours", mode, mu, log_var, mask, step=step, rng=rng, **overrides)
    z = np.asarray(
        losses.sample_logits(
            jnp.asarray(mu), jnp.asarray(log_var), rng, config.loss.num_samples, jnp.arange(B)
        ),
        np.float64,
    )
    t_r = config.loss.ramp_fraction * 400
    lam = config.loss.lambda_max * np.exp(-5 * (1 - step / t_r) ** 2)
    ref = np_ours(config, mode, mu, log_var, mask, z, _mc_probs(mode), lam)
    np.testing.assert_allclose(aux["lam"], lam, rtol=1e-5)
    for key, value in ref.items():
        np.testing.assert_allclose(aux[key], value, rtol=2e-5, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(total, ref["loss"], rtol=2e-5)
    # The variants do weight something: w > 1 somewhere, and the CE term moved.
    assert float(aux["mean_w"]) > 1.0 and float(aux["hl_ratio"]) != 1.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lambda_zero_is_ours_no_highlight_exactly(mode, variant):
    """`ours_no_highlight` is `ours` at lambda = 0 under every variant: w == 1, same loss."""
    mu, log_var, mask = _data(mode)
    kwargs = dict(step=1000, rng=jax.random.key(5), **VARIANTS[variant])
    total0, aux0 = _loss("ours", mode, mu, log_var, mask, **{**kwargs, "loss.lambda_max": 0.0})
    total, aux = _loss("ours_no_highlight", mode, mu, log_var, mask, **kwargs)
    assert float(aux["lam"]) == 0.0 and float(aux["mean_w"]) == 1.0
    assert float(aux["hl_ratio"]) == 1.0
    np.testing.assert_array_equal(total, total0)
    assert set(aux) == set(aux0)
    for key in aux:
        np.testing.assert_array_equal(aux[key], aux0[key], err_msg=key)
    # And at w = 1 every weighted term is the plain one (mean CE, mean L_unc, plain Dice), so the
    # loss of the ablation does not depend on the variant: the source of U only sets its logs.
    _, today = _loss("ours_no_highlight", mode, mu, log_var, mask, step=1000, rng=kwargs["rng"])
    for key in ("loss_seg", "loss_unc", "loss_dice", "loss"):
        np.testing.assert_allclose(aux[key], today[key], rtol=1e-6, err_msg=key)


@pytest.mark.parametrize("mode", MODES)
def test_weighted_soft_dice(mode):
    mu, _, mask = _data(mode)
    t = losses.targets_from_mask(jnp.asarray(mask), mode, K)
    ones = jnp.ones((B, H, W))
    for f in (losses.soft_dice_loss, jax.jit(losses.soft_dice_loss, static_argnums=2)):
        plain = f(jnp.asarray(mu), t, mode)
        # w = 1 gives the plain soft Dice bit for bit, eagerly and compiled.
        np.testing.assert_array_equal(f(jnp.asarray(mu), t, mode, 1e-5, None, ones), plain)
    w = np.random.default_rng(3).uniform(1, 3, (B, H, W))
    y = np_targets(mask, mode)
    got = losses.soft_dice_loss(jnp.asarray(mu), t, mode, 1e-5, None, jnp.asarray(w, jnp.float32))
    ref = np_weighted_dice_loss(np_probs(mu.astype(np.float64), mode), y, w, mode, 1e-5)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert abs(float(got) - float(plain)) > 1e-4


def test_top_q_selection_ties_and_bounds():
    u = np.random.default_rng(4).uniform(size=(B, H, W)).astype(np.float32)
    sel = np.asarray(losses.top_q_selection(jnp.asarray(u), 0.25))
    np.testing.assert_array_equal(sel, np_top_q(u, 0.25))
    assert np.all(sel.reshape(B, -1).sum(1) == 4)
    # Equal U: the lower row-major indices win, the same in every image and every layout.
    flat = np.asarray(losses.top_q_selection(jnp.zeros((2, H, W)), 0.25)).reshape(2, -1)
    np.testing.assert_array_equal(flat, np.repeat((np.arange(H * W) < 4)[None], 2, 0))
    # At least one pixel; q = 1 selects every pixel.
    assert float(losses.top_q_selection(jnp.asarray(u), 1e-6).sum()) == B
    np.testing.assert_array_equal(losses.top_q_selection(jnp.asarray(u), 1.0), 1.0)


def test_top_q_one_is_top_q_off():
    mu, log_var, mask = _data("sigmoid")
    _, off = _loss("ours", "sigmoid", mu, log_var, mask, step=1000)
    _, full = _loss(
        "ours", "sigmoid", mu, log_var, mask, step=1000, **{"loss.highlight_top_q": 1.0}
    )
    for key in off:
        np.testing.assert_array_equal(full[key], off[key], err_msg=key)


@pytest.mark.parametrize("mode", MODES)
def test_erm_nll_by_hand(mode):
    """erm + alpha x the uncertainty loss at sigma = 0: the channel-summed CE, no variance head."""
    mu, _, mask = _data(mode)
    y = np_targets(mask, mode)
    mu64 = mu.astype(np.float64)
    log_lik = np_log_lik(mu64, y, mode)
    ce, summed = -np.mean(log_lik, -1), -np.sum(log_lik, -1)
    dice = np_dice_loss(np_probs(mu64, mode), y, mode, 1e-5)
    total, aux = _loss("erm_nll", mode, mu, None, mask, **{"loss.alpha": 0.7})
    np.testing.assert_allclose(aux["loss_seg"], ce.mean(), rtol=1e-5)
    np.testing.assert_allclose(aux["loss_unc"], summed.mean(), rtol=1e-5)
    np.testing.assert_allclose(total, ce.mean() + dice + 0.7 * summed.mean(), rtol=1e-5)
    # Softmax: the extra term is the CE itself; sigmoid: K times the channel-averaged CE.
    np.testing.assert_allclose(aux["loss_unc"], (1 if mode == "softmax" else K) * ce.mean(), 1e-5)
    assert losses.num_logvar_channels(make_config(method="erm_nll"), K) == 0
    # It is exactly `ours`'s uncertainty loss at sigma -> 0.
    _, ours = _loss("ours", mode, mu, np.full_like(mu, -80.0), mask)
    np.testing.assert_allclose(aux["loss_unc"], ours["loss_unc"], rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_baselines_by_hand(mode):
    mu, log_var, mask = _data(mode)
    y = np_targets(mask, mode)
    mu64 = mu.astype(np.float64)
    log_p = np_log_lik(mu64, y, mode)
    ce = -np.mean(log_p, -1)
    dice = np_dice_loss(np_probs(mu64, mode), y, mode, 1e-5)
    k = round(0.2 * H * W)
    expected = {
        "erm": ce.mean(),
        "focal": np.mean(-np.mean((1 - np.exp(log_p)) ** 2 * log_p, -1)),
        "topk": np.sort(ce.reshape(B, -1), -1)[:, -k:].mean(),
    }
    u = np_entropy01(np_probs(mu64, mode), mode)
    lam_end = 1.0  # step 1000 >= t_r
    expected["entropy"] = np.sum((1 + lam_end * u) * ce) / np.sum(1 + lam_end * u)
    for method, seg in expected.items():
        total, aux = _loss(method, mode, mu, log_var, mask, step=1000)
        np.testing.assert_allclose(aux["loss_seg"], seg, rtol=1e-5, err_msg=method)
        np.testing.assert_allclose(total, seg + dice, rtol=1e-5, err_msg=method)
        assert ("loss_unc" in aux) is False
    # The ablation keeps L_unc and drops the highlighting: w = 1, L_hl = plain CE.
    total, aux = _loss("ours_no_highlight", mode, mu, log_var, mask, step=1000)
    assert float(aux["mean_w"]) == 1.0
    np.testing.assert_allclose(aux["loss_seg"], ce.mean(), rtol=1e-5)
    np.testing.assert_allclose(total, ce.mean() + dice + aux["loss_unc"], rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_zero_sigma_reduces_uncertainty_loss_to_cross_entropy(mode):
    mu, _, mask = _data(mode)
    # sigma = exp(-40) ~ 4e-18: every sample equals mu in float32.
    _, aux = _loss("ours", mode, mu, np.full_like(mu, -80.0), mask)
    _, erm = _loss("erm", mode, mu, None, mask)
    # Softmax: one categorical label per pixel, exactly CE. Sigmoid: the channels' BCEs add up,
    # i.e. K times the channel-averaged BCE of the segmentation loss.
    per_pixel_groups = 1 if mode == "softmax" else K
    np.testing.assert_allclose(aux["loss_unc"], per_pixel_groups * erm["loss_seg"], rtol=1e-6)


def test_weights_are_stop_gradient():
    mode = "sigmoid"
    mu, log_var, mask = _data(mode)
    config = make_config(method="ours", num_train_steps=10)
    rng, ids = jax.random.key(2), jnp.arange(B)

    def parts(mu, log_var):
        _, aux = losses.compute_loss(
            config, {"logits": mu, "log_var": log_var}, mask, rng, 50, mode, ids
        )
        return aux

    # L_hl depends on the log-variance only through the weights: no gradient must reach it.
    g = jax.grad(lambda lv: parts(jnp.asarray(mu), lv)["loss_seg"])(jnp.asarray(log_var))
    np.testing.assert_array_equal(g, 0.0)
    # Its gradient in mu is that of sum(w * CE) / sum(w) with w a constant.
    w = np.asarray(1 + parts(jnp.asarray(mu), jnp.asarray(log_var))["lam"] * _u(mu, log_var, rng))
    t = losses.targets_from_mask(jnp.asarray(mask), mode, K)

    def fixed(m):
        ce = losses.pixel_cross_entropy(m, t, mode)
        return jnp.sum(w * ce) / jnp.sum(w)

    g_mu = jax.grad(lambda m: parts(m, jnp.asarray(log_var))["loss_seg"])(jnp.asarray(mu))
    np.testing.assert_allclose(g_mu, jax.grad(fixed)(jnp.asarray(mu)), rtol=1e-5, atol=1e-8)
    # The entropy baseline's U comes from mu itself: it must be stopped as well.
    cfg_e = make_config(method="entropy", num_train_steps=10)

    def entropy_seg(m):
        return losses.compute_loss(cfg_e, {"logits": m}, mask, rng, 50, mode, ids)[1]["loss_seg"]

    u_e = np_entropy01(np_probs(mu.astype(np.float64), mode), mode)
    w = (1 + u_e).astype(np.float32)
    np.testing.assert_allclose(
        jax.grad(entropy_seg)(jnp.asarray(mu)),
        jax.grad(fixed)(jnp.asarray(mu)),
        rtol=1e-4,
        atol=1e-7,
    )


def _u(mu, log_var, rng):
    z = losses.sample_logits(jnp.asarray(mu), jnp.asarray(log_var), rng, 3, jnp.arange(B))
    return losses.normalized_entropy(losses.sample_mean_probs(z, "sigmoid"), "sigmoid")


@pytest.mark.parametrize("mode", MODES)
def test_gradients_finite_at_extremes(mode):
    mu, log_var, mask = _data(mode)
    # Confident and wrong logits, near-zero and huge variances.
    mu = np.where(np.arange(B)[:, None, None, None] % 2, 60.0, -60.0).astype(np.float32) + mu
    log_var = np.clip(log_var * 12, -30, 20).astype(np.float32)
    for method in losses.METHODS:
        config = make_config(method=method)
        has_head = method in losses.UNCERTAINTY_HEAD_METHODS

        def f(m, lv, config=config, has_head=has_head):
            out = {"logits": m, **({"log_var": lv} if has_head else {})}
            return losses.compute_loss(
                config, out, jnp.asarray(mask), jax.random.key(0), 1, mode, jnp.arange(B)
            )[0]

        loss, grads = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(mu), jnp.asarray(log_var))
        assert np.isfinite(float(loss)), method
        for g in grads:
            assert np.all(np.isfinite(np.asarray(g))), method


def test_unknown_options_raise():
    mu, log_var, mask = _data("softmax")
    with pytest.raises(ValueError, match="Unknown method"):
        _loss("nope", "softmax", mu, log_var, mask)
    with pytest.raises(ValueError, match="uncertainty_source"):
        _loss("ours", "softmax", mu, log_var, mask, **{"loss.uncertainty_source": "sigmaa"})
    with pytest.raises(ValueError, match="logvar_head"):
        losses.num_logvar_channels(make_config(**{"loss.logvar_head": "both"}), 2)
    assert losses.num_logvar_channels(make_config(method="erm"), 2) == 0
    assert losses.num_logvar_channels(make_config(**{"loss.logvar_head": "shared"}), 2) == 1


# Every value of every variant field is in one of these (the reductions and the per-image
# selections are what must not depend on the layout; each case is two compilations).
DEVICE_CASES = {
    "topk": ("topk", {}),
    "erm_nll": ("erm_nll", {}),
    "ours/today": ("ours", {}),
    "ours/all": ("ours", VARIANTS["all"]),
    "ours/sigma_ce+unc_top_q": ("ours", VARIANTS["sigma_ce+unc_top_q"]),
    "ours_no_highlight/all": ("ours_no_highlight", VARIANTS["all"]),
    # The oracle's band means (global-batch) and a delayed onset, past it at step 3 of 4.
    "ours/oracle_onset": (
        "ours",
        {"loss.uncertainty_source": "boundary_oracle", "loss.onset_fraction": 0.2},
    ),
}


@pytest.mark.parametrize("case", list(DEVICE_CASES))
def test_one_and_eight_devices_agree(case):
    """The global-batch reductions (psum over the data axis) make 8 shards give 1 device's loss
    and gradient (in mu and s) for every method and variant; top-q selects per image."""
    method, overrides = DEVICE_CASES[case]
    mode = "sigmoid"
    mu, log_var, mask = _data(mode)
    config = make_config(method=method, **overrides)
    rng = jax.random.key(11)
    outputs = _outputs(config, mode, mu, log_var)
    outputs.setdefault("log_var", jnp.asarray(log_var))  # unused by the methods without a head

    def per_device(outputs, mask):
        ids = parallel.example_ids(mask.shape[0])
        return losses.compute_loss(config, outputs, mask, rng, 3, mode, ids, parallel.AXIS)

    mesh = parallel.create_mesh(8)
    spec = jax.sharding.PartitionSpec(parallel.AXIS)
    sharded = jax.shard_map(
        per_device, mesh=mesh, in_specs=(spec, spec), out_specs=jax.sharding.PartitionSpec()
    )
    (loss8, aux8), grad8 = jax.jit(jax.value_and_grad(sharded, has_aux=True))(
        outputs, jnp.asarray(mask)
    )

    def one_device(outputs, mask):
        return losses.compute_loss(config, outputs, mask, rng, 3, mode, jnp.arange(B))

    (loss1, aux1), grad1 = jax.jit(jax.value_and_grad(one_device, has_aux=True))(
        outputs, jnp.asarray(mask)
    )
    np.testing.assert_allclose(loss8, loss1, rtol=2e-6)
    for k in aux1:
        np.testing.assert_allclose(aux8[k], aux1[k], rtol=2e-6, err_msg=k)
    for k in grad1:
        scale = float(np.max(np.abs(grad1[k])))
        np.testing.assert_allclose(grad8[k], grad1[k], rtol=0, atol=1e-5 * scale + 1e-12, err_msg=k)
    g = np.asarray(grad1["logits"])
    assert np.any(g != 0)
