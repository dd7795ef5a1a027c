"""Losses of every method, the pixel-wise uncertainty and the highlighting weights.

Shapes: logits mu and log-variance s are [B, H, W, K] (s may have 1 channel, shared); the class
mask is [B, H, W] int. Two label modes:
  * 'softmax': K mutually exclusive classes (prostate: background, gland).
  * 'sigmoid': K independent channels with nested targets, channel k = (mask > k)
    (fundus: OD = mask >= 1, OC = mask >= 2).

Batch reductions that are ratios of sums (the highlighted loss, soft Dice) must be taken over the
global batch for 1 and N devices to agree, so they go through `_gsum`, which sums over the named
data-parallel axis when one is given (`axis_name`), like BatchNorm's statistics.
Reductions over the T samples (or MC-dropout passes) go through `sum_over_samples` and
`mean_over_samples`: T - 1 elementwise operations on the slices instead of an XLA reduce over
the leading axis, which XLA:CPU runs as a slow loop. The training loss's likelihood term is
`sampled_nll`, the same function as `uncertainty_nll(sample_logits(...))` with a hand-written
gradient that works slice by slice (benchmarks/README.md, "Where a run's time goes").

See docs/method.md for the formulas.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.scipy.special import xlogy

from puseg_jax.model import boundary_band
from puseg_jax.model.loss_config import (  # noqa: F401 (re-exported: losses.METHODS etc.)
    DIAGNOSTIC_SOURCES,
    HIGHLIGHT_NORMS,
    HIGHLIGHT_TERMS,
    METHODS,
    UNCERTAINTY_HEAD_METHODS,
    UNCERTAINTY_SOURCES,
    num_logvar_channels,
    validate_loss_config,
)


def _gsum(x: jax.Array, axis_name: str | None, axis=None) -> jax.Array:
    """Sum over `axis` of this device's share, then over the data-parallel axis if named."""
    s = jnp.sum(x, axis=axis)
    return jax.lax.psum(s, axis_name) if axis_name else s


def _gmean(x: jax.Array, axis_name: str | None) -> jax.Array:
    """Mean over every element of the global batch (a ratio of global sums)."""
    return _gsum(x, axis_name) / _gsum(jnp.ones_like(x), axis_name)


def targets_from_mask(mask: jax.Array, label_mode: str, num_outputs: int) -> jax.Array:
    """Class mask -> float targets, one-hot (softmax) or nested channels (sigmoid).

    Args:
      mask: class indices [B, H, W] int.
      label_mode: 'softmax' or 'sigmoid'.
      num_outputs: K, channels of the logit head.

    Returns:
      [B, H, W, K] float32 targets; in the sigmoid mode channel k is (mask > k).
    """
    if label_mode == "softmax":
        return jax.nn.one_hot(mask, num_outputs, dtype=jnp.float32)
    if label_mode == "sigmoid":
        return (mask[..., None] > jnp.arange(num_outputs)).astype(jnp.float32)
    raise ValueError(f"Unknown label_mode {label_mode!r}")


def probabilities(logits: jax.Array, label_mode: str) -> jax.Array:
    """Class probabilities [..., K]: softmax over channels, or a sigmoid per channel."""
    return jax.nn.softmax(logits) if label_mode == "softmax" else jax.nn.sigmoid(logits)


def pixel_log_likelihood(logits: jax.Array, targets: jax.Array, label_mode: str) -> jax.Array:
    """log p(y | logits), computed from the logits (log-softmax, log-sigmoid), never log(p).

    Args:
      logits: [..., K].
      targets: [..., K] from `targets_from_mask`.
      label_mode: 'softmax' or 'sigmoid'.

    Returns:
      [..., 1] for softmax (one categorical label per pixel), [..., K] for sigmoid (one
      Bernoulli label per channel).
    """
    if label_mode == "softmax":
        return jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1, keepdims=True)
    return -optax.sigmoid_binary_cross_entropy(logits, targets)


def pixel_cross_entropy(logits: jax.Array, targets: jax.Array, label_mode: str) -> jax.Array:
    """Cross-entropy per pixel [B, H, W]; for sigmoid the BCE averaged over the channels.

    The channel average keeps the pixel loss on the scale of the usual element-wise mean BCE of
    multi-label segmentation (the `erm` baseline's loss); the uncertainty loss, a likelihood of
    the whole label, sums over the channels instead (see `uncertainty_nll`).
    """
    return -jnp.mean(pixel_log_likelihood(logits, targets, label_mode), axis=-1)


def soft_dice_loss(
    logits: jax.Array,
    targets: jax.Array,
    label_mode: str,
    eps: float = 1e-5,
    axis_name: str | None = None,
    weights: jax.Array | None = None,
) -> jax.Array:
    """1 - soft Dice of the foreground over the whole (global) batch, averaged over structures.

    Args:
      logits: [B, H, W, K].
      targets: [B, H, W, K] from `targets_from_mask`.
      label_mode: 'softmax' (foreground = channels 1..K-1) or 'sigmoid' (every channel).
      eps: smoothing added to numerator and denominator.
      axis_name: data-parallel axis to sum over, or None.
      weights: optional per-pixel weights w [B, H, W] (the highlighting), shared by the
        structures; None is the plain soft Dice (and w = 1 gives exactly the same value).

    Returns:
      Scalar 1 - (2 sum w p y + eps) / (sum w p + sum w y + eps), structure-averaged.
    """
    probs = probabilities(logits, label_mode)
    if label_mode == "softmax":
        probs, targets = probs[..., 1:], targets[..., 1:]
    axes = tuple(range(probs.ndim - 1))
    if weights is None:
        inter = _gsum(probs * targets, axis_name, axes)
        denom = _gsum(probs, axis_name, axes) + _gsum(targets, axis_name, axes)
    else:
        # At w = 1 each product is p y, p or y bit for bit: the plain soft Dice exactly.
        w = weights[..., None]
        inter = _gsum(w * probs * targets, axis_name, axes)
        denom = _gsum(w * probs, axis_name, axes) + _gsum(w * targets, axis_name, axes)
    return 1.0 - jnp.mean((2.0 * inter + eps) / (denom + eps))


def focal_pixel_loss(
    logits: jax.Array, targets: jax.Array, label_mode: str, gamma: float
) -> jax.Array:
    """Focal loss per pixel [B, H, W]: -(1 - p_y)^gamma log p_y (channel-averaged for sigmoid)."""
    log_p = pixel_log_likelihood(logits, targets, label_mode)
    # 1 - p_y as -expm1(log p_y): exact for confident pixels, where 1 - exp() cancels to 0.
    return -jnp.mean((-jnp.expm1(log_p)) ** gamma * log_p, axis=-1)


def topk_image_loss(ce: jax.Array, fraction: float) -> tuple[jax.Array, jax.Array]:
    """Sum and count of the hardest `fraction` of pixels of each image.

    Selected per image, so any device layout selects the same pixels.

    Args:
      ce: per-pixel losses [B, H, W].
      fraction: k, the share of pixels kept per image (at least one).

    Returns:
      (sum of the selected losses, their number), over this device's images.
    """
    flat = ce.reshape(ce.shape[0], -1)
    k = max(1, int(round(fraction * flat.shape[1])))
    top, _ = jax.lax.top_k(flat, k)
    return jnp.sum(top), jnp.asarray(top.size, jnp.float32)


def sample_noise(
    rng: jax.Array, num_samples: int, example_ids: jax.Array, shape: tuple[int, ...]
) -> jax.Array:
    """eps_t ~ N(0, 1), [T, B, H, W, K] for logits of `shape` [B, H, W, K].

    The noise of each example is drawn from `fold_in(rng, example_id)`, with the example's index
    in the global batch, so the draws do not depend on how the batch is split across devices.
    """

    def one(eid):
        return jax.random.normal(jax.random.fold_in(rng, eid), (num_samples,) + tuple(shape[1:]))

    # A loop over the examples (`lax.map`), not `vmap`: the same numbers, but the loop's output
    # is a buffer XLA cannot fuse into the consumers. Under vmap XLA:CPU recomputed the last
    # stage of the generator (erf_inv) inside each of the likelihood term's forward and
    # backward loops: 78 ms for noise and likelihood term with their gradient instead of 39.
    return jnp.swapaxes(jax.lax.map(one, example_ids), 0, 1)


def sample_logits(
    mu: jax.Array, log_var: jax.Array, rng: jax.Array, num_samples: int, example_ids: jax.Array
) -> jax.Array:
    """z_t = mu + exp(s / 2) * eps_t, [T, B, H, W, K], with eps from `sample_noise`.

    Args:
      mu: logits [B, H, W, K].
      log_var: s, [B, H, W, K] or [B, H, W, 1] (one variance shared by the classes; the noise
        is still drawn independently per class).
      rng: the step's key.
      num_samples: T.
      example_ids: [B] indices of these examples in the global batch.

    Returns:
      [T, B, H, W, K] float32 logit samples.
    """
    eps = sample_noise(rng, num_samples, example_ids, mu.shape)
    return mu[None] + jnp.exp(0.5 * log_var)[None] * eps


def sum_over_samples(x: jax.Array) -> jax.Array:
    """Sum over the leading (sample) axis, [T, ...] -> [...], as T - 1 elementwise adds.

    The same sum as `jnp.sum(x, axis=0)` up to float rounding (added left to right): on the
    fundus CPU budget's [10, 8, 128, 128, 2] samples XLA:CPU takes 14 ms for the reduce and
    0.2 ms for the adds, which it fuses with the producer of `x` (benchmarks/README.md,
    "Where a run's time goes"). T is small (the samples of a step), so unrolling is cheap.
    """
    return functools.reduce(jnp.add, [x[t] for t in range(x.shape[0])])


def mean_over_samples(x: jax.Array) -> jax.Array:
    """`jnp.mean(x, axis=0)` for a small leading sample axis (see `sum_over_samples`)."""
    return sum_over_samples(x) / x.shape[0]


def uncertainty_nll(z: jax.Array, targets: jax.Array, label_mode: str) -> jax.Array:
    """Heteroscedastic loss per pixel [B, H, W]: -(logsumexp_t log p(y|z_t) - log T).

    That is -log((1/T) sum_t p(y|z_t)), computed in log space so that confident samples do not
    underflow. In the sigmoid mode it is summed over the channels (the label's channels are
    independent Bernoulli variables, so their log-likelihoods add).

    Args:
      z: logit samples [T, B, H, W, K].
      targets: [B, H, W, K] from `targets_from_mask`.
      label_mode: 'softmax' or 'sigmoid'.

    Returns:
      [B, H, W] per-pixel negative log-likelihood.
    """
    log_p = jax.vmap(lambda zt: pixel_log_likelihood(zt, targets, label_mode))(z)
    per_group = jax.nn.logsumexp(log_p, axis=0) - jnp.log(z.shape[0])
    return -jnp.sum(per_group, axis=-1)


def _log_likelihood_and_score(
    z: jax.Array, targets: jax.Array, label_mode: str
) -> tuple[jax.Array, jax.Array]:
    """log p(y | z) as `pixel_log_likelihood`, and its gradient w.r.t. z: y - p(z).

    For sigmoid each channel is a Bernoulli label (d/dz log p = y - sigmoid(z)); for softmax
    the one-hot label gives d/dz sum_k y_k log softmax(z)_k = y - softmax(z).
    """
    return pixel_log_likelihood(z, targets, label_mode), targets - probabilities(z, label_mode)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def sampled_nll(
    mu: jax.Array, log_var: jax.Array, eps: jax.Array, targets: jax.Array, label_mode: str
) -> jax.Array:
    """`uncertainty_nll(mu + exp(s / 2) * eps, targets)`, [B, H, W], computed sample by sample.

    The same loss and, to float rounding, the same gradients w.r.t. mu and s as automatic
    differentiation of `uncertainty_nll(sample_logits(...))` (tests/test_losses.py checks both);
    no gradient reaches eps or targets. Why not autodiff: on CPU, XLA's reduce over the leading
    sample axis and the transposes of its slices cost 4-50 times the arithmetic (the likelihood
    term was 114 of the 157 ms that `ours` adds to a fundus CPU-budget step).

    Args:
      mu: logits [B, H, W, K].
      log_var: s, [B, H, W, K] or [B, H, W, 1].
      eps: standard normal noise [T, B, H, W, K] (`sample_noise`).
      targets: [B, H, W, K] from `targets_from_mask`.
      label_mode: 'softmax' or 'sigmoid'.
    """
    return _sampled_nll_fwd(mu, log_var, eps, targets, label_mode)[0]


def _sampled_nll_fwd(mu, log_var, eps, targets, label_mode):
    sigma = jnp.exp(0.5 * log_var)
    log_p = jnp.stack([pixel_log_likelihood(mu + sigma * e, targets, label_mode) for e in eps])
    # Computed once and kept: fused into both of its consumers below (the maximum and the sum
    # of exponentials), XLA:CPU recomputed it and the forward took 32 ms instead of 8.
    log_p = list(jax.lax.optimization_barrier(log_p))
    top = functools.reduce(jnp.maximum, log_p)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    lse = top + jnp.log(functools.reduce(jnp.add, [jnp.exp(lp - top) for lp in log_p]))
    nll = -jnp.sum(lse - jnp.log(len(eps)), axis=-1)
    return nll, (mu, log_var, eps, targets, lse)


def _sampled_nll_bwd(label_mode, residuals, g):
    # The barrier keeps XLA from fusing the forward's work into the backward's loops (which
    # recomputed it per use: 54 ms for forward and backward instead of 15).
    mu, log_var, eps, targets, lse, g = jax.lax.optimization_barrier((*residuals, g))
    sigma = jnp.exp(0.5 * log_var)
    g_mu = g_eps = None
    for t in range(len(eps)):
        log_p, score = _log_likelihood_and_score(mu + sigma * eps[t], targets, label_mode)
        # d nll / d z_t = -g * softmax_t(log p) * (y - p(z_t)), per channel group.
        c = -g[..., None] * jnp.exp(log_p - lse) * score
        g_mu = c if g_mu is None else g_mu + c
        g_eps = c * eps[t] if g_eps is None else g_eps + c * eps[t]
    g_s = 0.5 * sigma * g_eps
    if log_var.shape[-1] != g_s.shape[-1]:  # one variance shared by the channels
        g_s = jnp.sum(g_s, axis=-1, keepdims=True)
    return g_mu, g_s, None, None


sampled_nll.defvjp(_sampled_nll_fwd, _sampled_nll_bwd)


def normalized_entropy(probs: jax.Array, label_mode: str) -> jax.Array:
    """Predictive entropy in [0, 1] per pixel.

    Args:
      probs: [B, H, W, K] probabilities (e.g. the sample mean p_bar).
      label_mode: 'softmax' (entropy / log K) or 'sigmoid' (binary entropy / log 2 per channel,
        maximum over the channels).

    Returns:
      [B, H, W] in [0, 1].
    """
    # xlogy(p, p) is exactly 0 at p = 0. The usual p * log(p + tiny) is not safe under jit: XLA
    # may rewrite log(1 - p + tiny) as log((1 + tiny) - p) = log(0) at p = 1, and 0 * -inf is
    # NaN. A sample mean of probabilities can also round past 1, hence the clip.
    probs = jnp.clip(probs, 0.0, 1.0)
    if label_mode == "softmax":
        ent = -jnp.sum(xlogy(probs, probs), axis=-1)
        return ent / jnp.log(probs.shape[-1])
    q = 1.0 - probs
    ent = -(xlogy(probs, probs) + xlogy(q, q))
    return jnp.max(ent / jnp.log(2.0), axis=-1)


def sample_mean_probs(z: jax.Array, label_mode: str) -> jax.Array:
    """p_bar = (1/T) sum_t probabilities(z_t), [B, H, W, K] from samples [T, B, H, W, K]."""
    return mean_over_samples(probabilities(z, label_mode))


def sigma_uncertainty(log_var: jax.Array) -> jax.Array:
    """U from sigma itself: channel-mean sigma, min-max normalised per image to [0, 1].

    Args:
      log_var: s, [B, H, W, K] or [B, H, W, 1].

    Returns:
      [B, H, W] in [0, 1] (0 everywhere in an image whose sigma is constant).
    """
    sigma = jnp.mean(jnp.exp(0.5 * log_var), axis=-1)
    lo = jnp.min(sigma, axis=(1, 2), keepdims=True)
    hi = jnp.max(sigma, axis=(1, 2), keepdims=True)
    return (sigma - lo) / jnp.maximum(hi - lo, 1e-12)


def top_q_selection(u: jax.Array, q: float) -> jax.Array:
    """1 on the `q` most uncertain pixels of each image, 0 elsewhere.

    Selected per image, so every device layout selects the same pixels. `lax.top_k` puts the
    lower index first among equal values, which resolves ties deterministically (row-major
    order within the image).

    Args:
      u: uncertainty [B, H, W].
      q: share of each image's pixels selected, in (0, 1]; round(q H W), at least one.

    Returns:
      [B, H, W] float32 selection.
    """
    flat = u.reshape(u.shape[0], -1)
    k = max(1, int(round(q * flat.shape[1])))
    _, idx = jax.lax.top_k(flat, k)
    rows = jnp.arange(flat.shape[0])[:, None]
    return jnp.zeros(flat.shape, jnp.float32).at[rows, idx].set(1.0).reshape(u.shape)


def weighted_pixel_mean(
    x: jax.Array, w: jax.Array, norm: str, axis_name: str | None = None
) -> jax.Array:
    """A highlighted per-pixel loss over the global batch.

    Args:
      x: per-pixel loss [B, H, W].
      w: weights [B, H, W].
      norm: 'weighted_mean' (sum w x / sum w: the weights move loss between pixels and keep its
        scale) or 'mean' (mean of w x: the scale grows with mean w).
      axis_name: data-parallel axis to sum over, or None.

    Returns:
      Scalar.
    """
    if norm == "weighted_mean":
        return _gsum(w * x, axis_name) / _gsum(w, axis_name)
    if norm == "mean":
        return _gmean(w * x, axis_name)
    raise ValueError(f"Unknown loss.highlight_norm {norm!r}; expected one of {HIGHLIGHT_NORMS}")


def highlight_lambda(
    step: jax.Array, lambda_max: float, ramp_steps: float, onset_steps: float = 0.0
) -> jax.Array:
    """lambda(t) = lambda_max * exp(-5 (1 - t / t_r)^2) for t < t_r, lambda_max after.

    The sigmoid-shaped ramp (of temporal ensembling and mean-teacher consistency weights) keeps
    the highlighting weak while the early uncertainty maps are still noise. A delayed onset t_o
    holds lambda at 0 before it and starts the same ramp there: lambda(t) = 0 for t < t_o, then
    the formula at t - t_o.

    Args:
      step: t, the global step (0-based).
      lambda_max: strength after the ramp.
      ramp_steps: t_r in steps; <= 0 disables the ramp.
      onset_steps: t_o in steps; <= 0 (the default) is no delay, today's schedule exactly.

    Returns:
      Scalar float32 lambda(t).
    """
    if onset_steps > 0:
        t = jnp.asarray(step, jnp.float32)
        after = highlight_lambda(t - onset_steps, lambda_max, ramp_steps)
        return jnp.where(t < onset_steps, 0.0, after).astype(jnp.float32)
    t = jnp.asarray(step, jnp.float32)
    if ramp_steps <= 0:
        return jnp.asarray(lambda_max, jnp.float32)
    ramp = lambda_max * jnp.exp(-5.0 * (1.0 - t / ramp_steps) ** 2)
    return jnp.where(t < ramp_steps, ramp, lambda_max).astype(jnp.float32)


def uncertainty_map(
    config: ml_collections.ConfigDict,
    outputs: dict[str, jax.Array],
    rng: jax.Array,
    label_mode: str,
    example_ids: jax.Array,
    eps: jax.Array | None = None,
) -> jax.Array:
    """U of the method, [B, H, W] in [0, 1]: what the highlighting weights and diagnostics read.

    The methods without a variance head (the `entropy` baseline, and for the diagnostics `erm`,
    `focal`, `topk`, `erm_nll`) use the normalised entropy of softmax/sigmoid(mu). `ours` uses
    `loss.uncertainty_source`; 'boundary_oracle' returns the sample entropy, the map whose mean
    the oracle's weights match (`compute_loss` then moves that weight onto the band).

    Args:
      config: uses `method` and `loss.uncertainty_source`, `loss.num_samples`.
      outputs: 'logits', and 'log_var' / 'mc_probs' as `compute_loss` takes them.
      rng: the step's sampling key (the one `compute_loss` gets).
      label_mode: 'softmax' or 'sigmoid'.
      example_ids: [B] indices of the examples in the global batch.
      eps: the sampling noise when already drawn from `rng` (`sample_noise`; else drawn here,
        the same values).

    Returns:
      [B, H, W] uncertainty, with gradient (callers stop it).
    """
    mu = outputs["logits"]
    if config.method not in UNCERTAINTY_HEAD_METHODS:
        return normalized_entropy(probabilities(mu, label_mode), label_mode)
    lc = config.loss
    if lc.uncertainty_source == "sigma":
        return sigma_uncertainty(outputs["log_var"])
    if lc.uncertainty_source == "mc_dropout":
        if "mc_probs" not in outputs:
            raise ValueError(
                "loss.uncertainty_source='mc_dropout' needs outputs['mc_probs'], the "
                "mean probabilities of the MC-dropout passes (train.train_step adds them)"
            )
        return normalized_entropy(outputs["mc_probs"], label_mode)
    if eps is None:
        eps = sample_noise(rng, lc.num_samples, example_ids, mu.shape)
    # No gradient: U weights the loss as a constant. The samples are formed and averaged slice
    # by slice (`sum_over_samples`), which XLA fuses into one pass.
    mu, sigma = jax.lax.stop_gradient((mu, jnp.exp(0.5 * outputs["log_var"])))
    probs = [probabilities(mu + sigma * e, label_mode) for e in eps]
    return normalized_entropy(functools.reduce(jnp.add, probs) / len(probs), label_mode)


def compute_loss(
    config: ml_collections.ConfigDict,
    outputs: dict[str, jax.Array],
    mask: jax.Array,
    rng: jax.Array,
    step: jax.Array,
    label_mode: str,
    example_ids: jax.Array,
    axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
    """The training loss of `config.method` on one (per-device share of the) batch.

    Args:
      config: the experiment config (uses `method`, `loss.*`, `num_train_steps`).
      outputs: the network outputs ('logits', and 'log_var' for the uncertainty methods), and
        for `loss.uncertainty_source='mc_dropout'` 'mc_probs', the mean probabilities of the
        MC-dropout passes [B, H, W, K] (see `steps.train_step`).
      mask: class mask [B, H, W] int32.
      rng: the step's key (same on every device).
      step: the global step, for the lambda ramp.
      label_mode: 'softmax' or 'sigmoid'.
      example_ids: [B] indices of these examples in the global batch.
      axis_name: data-parallel axis to reduce over, or None on one device.

    Returns:
      (loss, aux): aux holds the loss terms and, for the highlighting methods, lambda, mean U,
      mean w, `hl_ratio` (the weighted CE term over the plain mean CE) and `hl_fraction` (the
      share of pixels eligible for w > 1: highlight_top_q, or 1); all global-batch values.
    """
    method, lc = config.method, config.loss
    validate_loss_config(config)
    mu = outputs["logits"]
    targets = targets_from_mask(mask, label_mode, mu.shape[-1])
    ce = pixel_cross_entropy(mu, targets, label_mode)
    aux: dict[str, Any] = {}
    dice_weights = None

    if method in ("erm", "erm_nll"):
        seg = _gmean(ce, axis_name)
        if method == "erm_nll":
            # The uncertainty loss at sigma = 0 (one sample, z = mu): the channel-summed CE.
            aux["loss_unc"] = _gmean(uncertainty_nll(mu[None], targets, label_mode), axis_name)
    elif method == "focal":
        seg = _gmean(focal_pixel_loss(mu, targets, label_mode, lc.focal_gamma), axis_name)
    elif method == "topk":
        total, count = topk_image_loss(ce, lc.topk_fraction)
        seg = _gsum(total, axis_name) / _gsum(count, axis_name)
    else:
        # The ablation is `ours` at lambda_max = 0, traced the same way: w == 1 exactly.
        lam_max = 0.0 if method == "ours_no_highlight" else lc.lambda_max
        lam = highlight_lambda(
            step,
            lam_max,
            lc.ramp_fraction * config.num_train_steps,
            lc.onset_fraction * config.num_train_steps,
        )
        nll = None
        if method == "entropy":
            # The single-pass baseline keeps its own U and today's weighting of the CE only.
            u = uncertainty_map(config, outputs, rng, label_mode, example_ids)
            terms, norm, top_q = "ce", "weighted_mean", 0.0
        else:
            eps = sample_noise(rng, lc.num_samples, example_ids, mu.shape)
            nll = sampled_nll(mu, outputs["log_var"], eps, targets, label_mode)
            u = uncertainty_map(config, outputs, rng, label_mode, example_ids, eps=eps)
            if lc.uncertainty_source == "boundary_oracle":
                band = boundary_band.boundary_band(
                    mask, label_mode, mu.shape[-1], lc.oracle_band_px
                )
                u = boundary_band.oracle_uncertainty(band, u, axis_name)
            terms, norm, top_q = lc.highlight_terms, lc.highlight_norm, lc.highlight_top_q
        u = jax.lax.stop_gradient(u)
        selected = top_q_selection(u, top_q) if top_q > 0 else jnp.ones_like(u)
        w = 1.0 + lam * (selected * u if top_q > 0 else u)
        seg = weighted_pixel_mean(ce, w, norm, axis_name)
        if nll is not None:
            weighted_unc = terms in ("ce+unc", "ce+unc+dice")
            aux["loss_unc"] = (
                weighted_pixel_mean(nll, w, norm, axis_name)
                if weighted_unc
                else _gmean(nll, axis_name)
            )
        if terms == "ce+unc+dice":
            dice_weights = w
        aux.update(
            lam=lam,
            mean_u=_gmean(u, axis_name),
            mean_w=_gmean(w, axis_name),
            hl_ratio=seg / _gmean(ce, axis_name),
            hl_fraction=_gmean(selected, axis_name),
        )

    aux["loss_dice"] = soft_dice_loss(mu, targets, label_mode, lc.dice_eps, axis_name, dice_weights)
    aux["loss_seg"] = seg
    loss = seg + lc.dice_weight * aux["loss_dice"]
    if "loss_unc" in aux:
        loss = loss + lc.alpha * aux["loss_unc"]
    aux["loss"] = loss
    return loss, aux
