"""The oracle's boundary band and weights, the delayed onset, and the highlighting diagnostics
(docs/method.md, "The oracle, the onset and the diagnostics"), against NumPy by hand."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from puseg_jax import parallel
from puseg_jax.model import boundary_band, losses
from tests.conftest import random_batches
from tests.conftest import test_config as make_config

# ---------------------------------------------------------------------------------------------
# The band.


def np_band(mask, mode, num_outputs, k):
    """Pixel in the band when its (2k+1)^2 window, cut at the edge, holds both sides of a
    structure: written from the definition, pixel by pixel."""
    if mode == "softmax":
        maps = [mask == c for c in range(1, num_outputs)]
    else:
        maps = [mask > c for c in range(num_outputs)]
    b, h, w = mask.shape
    out = np.zeros(mask.shape, np.float32)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                for m in maps:
                    win = m[n, max(0, i - k) : i + k + 1, max(0, j - k) : j + k + 1]
                    if win.any() and not win.all():
                        out[n, i, j] = 1.0
    return out


def test_band_by_hand():
    # One foreground pixel in the middle of a 5x5 image: k = 1 gives its 3x3 neighbourhood.
    dot = np.zeros((1, 5, 5), np.int32)
    dot[0, 2, 2] = 1
    expected = np.zeros((1, 5, 5), np.float32)
    expected[0, 1:4, 1:4] = 1
    np.testing.assert_array_equal(boundary_band.boundary_band(dot, "softmax", 2, 1), expected)
    np.testing.assert_array_equal(
        boundary_band.boundary_band(dot, "softmax", 2, 2), np.ones_like(expected)
    )

    # A vertical edge between columns 2 and 3 of a 4x6 image: k px on each side, the image edge
    # is no boundary.
    half = np.zeros((1, 4, 6), np.int32)
    half[0, :, :3] = 1
    for k, cols in ((1, [2, 3]), (2, [1, 2, 3, 4])):
        expected = np.zeros((1, 4, 6), np.float32)
        expected[0, :, cols] = 1
        np.testing.assert_array_equal(boundary_band.boundary_band(half, "softmax", 2, k), expected)

    # Nested disc (columns 0-3) and cup (columns 0-1) of a 3x8 image, k = 1: the cup's edge gives
    # columns 1-2, the disc's 3-4. The same mask read as 3 exclusive classes has the same band.
    nested = np.zeros((1, 3, 8), np.int32)
    nested[0, :, :4] = 1
    nested[0, :, :2] = 2
    expected = np.zeros((1, 3, 8), np.float32)
    expected[0, :, 1:5] = 1
    np.testing.assert_array_equal(boundary_band.boundary_band(nested, "sigmoid", 2, 1), expected)
    np.testing.assert_array_equal(boundary_band.boundary_band(nested, "softmax", 3, 1), expected)
    # Without the cup only the disc's edge is left.
    disc_only = np.minimum(nested, 1)
    expected[0, :, 1:3] = 0
    np.testing.assert_array_equal(boundary_band.boundary_band(disc_only, "sigmoid", 2, 1), expected)


@pytest.mark.parametrize(
    "mode, num_outputs, k", [("sigmoid", 2, 1), ("sigmoid", 2, 3), ("softmax", 3, 2)]
)
def test_band_matches_the_definition_on_random_masks(mode, num_outputs, k):
    rs = np.random.RandomState(k)
    # Blocky masks, so that the band neither covers everything nor is empty.
    block = np.ones((1, 3 * k, 3 * k), np.int32)
    mask = np.kron(rs.randint(0, 3, (3, 4, 5)), block).astype(np.int32)
    band = np.asarray(boundary_band.boundary_band(mask, mode, num_outputs, k))
    np.testing.assert_array_equal(band, np_band(mask, mode, num_outputs, k))
    assert 0 < band.mean() < 1


# ---------------------------------------------------------------------------------------------
# The oracle's weights.


def _band_and_u(seed=0):
    rs = np.random.RandomState(seed)
    mask = np.kron(rs.randint(0, 3, (8, 2, 2)), np.ones((1, 4, 4), np.int32)).astype(np.int32)
    band = boundary_band.boundary_band(mask, "sigmoid", 2, 1)
    u = rs.uniform(0, 1, mask.shape).astype(np.float32)
    return mask, band, u


def test_oracle_weights_sit_on_the_band_with_the_mean_of_u():
    _, band, u = _band_and_u()
    band_np = np.asarray(band)
    assert 0.1 < band_np.mean() < 0.9
    uo = np.asarray(boundary_band.oracle_uncertainty(band, jnp.asarray(u)))
    np.testing.assert_array_equal(uo[band_np == 0], 0.0)
    on = uo[band_np == 1]
    np.testing.assert_allclose(on, u.mean() / band_np.mean(), rtol=1e-6)
    np.testing.assert_allclose(uo.mean(), u.mean(), rtol=1e-6)
    # No boundary anywhere: no weight, and no NaN from 0 / 0.
    zero = boundary_band.oracle_uncertainty(jnp.zeros_like(band), jnp.asarray(u))
    np.testing.assert_array_equal(zero, 0.0)

    # On 8 devices the means are global-batch means.
    def per_device(band, u):
        return boundary_band.oracle_uncertainty(band, u, parallel.AXIS)

    spec = jax.sharding.PartitionSpec(parallel.AXIS)
    sharded = jax.shard_map(
        per_device, mesh=parallel.create_mesh(8), in_specs=(spec, spec), out_specs=spec
    )
    np.testing.assert_allclose(jax.jit(sharded)(band, jnp.asarray(u)), uo, rtol=1e-6)


def _ours(mode, mask, step=3, **overrides):
    rs = np.random.RandomState(1)
    shape = mask.shape + (2,)
    outputs = {
        "logits": jnp.asarray(rs.normal(0, 2, shape).astype(np.float32)),
        "log_var": jnp.asarray(rs.normal(-1, 1, shape).astype(np.float32)),
    }
    config = make_config(
        **{"method": "ours", "num_train_steps": 10, "loss.lambda_max": 3.0, **overrides}
    )
    ids = jnp.arange(mask.shape[0])
    loss, aux = losses.compute_loss(
        config, outputs, jnp.asarray(mask), jax.random.key(4), step, mode, ids
    )
    return config, outputs, loss, aux


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_oracle_loss_by_hand(mode):
    """Same mean weight as the entropy variant at that step, all of it on the band."""
    mask, _, _ = _band_and_u()
    mask = np.minimum(mask, 1) if mode == "softmax" else mask
    fields = {"loss.ramp_fraction": 0.0, "loss.oracle_band_px": 2}
    config, outputs, loss, aux = _ours(
        mode, mask, **fields, **{"loss.uncertainty_source": "boundary_oracle"}
    )
    _, _, _, aux_entropy = _ours(mode, mask, **fields)
    band = np_band(mask, mode, 2, 2)
    z = losses.sample_logits(
        outputs["logits"], outputs["log_var"], jax.random.key(4), 3, jnp.arange(8)
    )
    u = np.asarray(losses.normalized_entropy(losses.sample_mean_probs(z, mode), mode), np.float64)
    w = 1.0 + 3.0 * band * u.mean() / band.mean()
    targets = losses.targets_from_mask(jnp.asarray(mask), mode, 2)
    ce = np.asarray(losses.pixel_cross_entropy(outputs["logits"], targets, mode), np.float64)
    np.testing.assert_allclose(aux["loss_seg"], np.sum(w * ce) / np.sum(w), rtol=1e-5)
    np.testing.assert_allclose(aux["mean_w"], w.mean(), rtol=1e-6)
    np.testing.assert_allclose(aux["mean_w"], aux_entropy["mean_w"], rtol=1e-6)
    # Only the weights moved: the same samples, the same unweighted terms.
    assert float(aux["loss_unc"]) == float(aux_entropy["loss_unc"])
    assert float(aux["loss_dice"]) == float(aux_entropy["loss_dice"])
    assert float(aux["loss_seg"]) != float(aux_entropy["loss_seg"])


# ---------------------------------------------------------------------------------------------
# The onset.


def test_onset_schedule():
    lam_max, t_r, t_o = 10.0, 20, 50
    before = [float(losses.highlight_lambda(t, lam_max, t_r, t_o)) for t in range(t_o)]
    assert before == [0.0] * t_o
    for t in range(t_o, t_o + 40):
        got = float(losses.highlight_lambda(t, lam_max, t_r, t_o))
        assert got == float(losses.highlight_lambda(t - t_o, lam_max, t_r)), t
    assert float(losses.highlight_lambda(t_o, lam_max, t_r, t_o)) == pytest.approx(
        lam_max * np.exp(-5.0)
    )
    assert float(losses.highlight_lambda(t_o + t_r, lam_max, t_r, t_o)) == lam_max
    # The arm: 0 for the first half, then 10 at once (no ramp).
    assert [float(losses.highlight_lambda(t, 10.0, 0, 100)) for t in (0, 99, 100, 199)] == [
        0,
        0,
        10,
        10,
    ]
    # Onset 0 is today's schedule, value for value.
    for t in (0, 5, 19, 20, 300):
        assert float(losses.highlight_lambda(t, 3.0, 20, 0.0)) == float(
            losses.highlight_lambda(t, 3.0, 20)
        )


def test_onset_in_the_loss():
    mask, _, _ = _band_and_u()
    fields = {"loss.onset_fraction": 0.5, "loss.ramp_fraction": 0.0}
    _, _, loss, aux = _ours("sigmoid", mask, step=4, **fields)
    _, _, loss_off, _ = _ours("sigmoid", mask, step=4, method="ours_no_highlight")
    # Before the onset the loss is that of lambda = 0, bit for bit.
    assert float(aux["lam"]) == 0.0 and float(aux["mean_w"]) == 1.0
    assert float(loss) == float(loss_off)
    _, _, _, aux = _ours("sigmoid", mask, step=5, **fields)
    assert float(aux["lam"]) == 3.0 and float(aux["mean_w"]) > 1.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"loss.oracle_band_px": 0}, "oracle_band_px"),
        ({"loss.onset_fraction": 1.0}, "onset_fraction"),
        ({"loss.onset_fraction": -0.1}, "onset_fraction"),
        ({"loss.diagnostics_every_steps": -1}, "diagnostics_every_steps"),
        ({"loss.uncertainty_source": "boundary_oracle", "loss.highlight_top_q": 0.2}, "top_q"),
    ],
)
def test_new_fields_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        losses.validate_loss_config(make_config(**overrides))


# ---------------------------------------------------------------------------------------------
# The diagnostics.


def test_due():
    from puseg_jax.train.diagnostics import due

    assert [s for s in range(12) if due(s, 1, 4)] == [3, 7, 11]
    # Two steps per call from step 0: the calls that reach 4 and 8.
    assert [s for s in range(0, 12, 2) if due(s, 2, 4)] == [2, 6, 10]
    assert not any(due(s, 1, 0) for s in range(12))


def test_highlight_statistics_by_hand():
    from puseg_jax.train.diagnostics import highlight_statistics

    # Two 5x4 images: the top 10% is 2 pixels each; the gradient sits mostly on image 0's top.
    u = np.zeros((2, 5, 4), np.float32)
    u[0, 0, :2] = [0.9, 0.8]
    u[1, 4, 2:] = [0.7, 0.6]
    g = np.full((2, 5, 4, 2), 0.01, np.float32)
    g[0, 0, 0] = [3.0, -1.0]  # |g| summed over channels: 4
    band = np.zeros((2, 5, 4), np.float32)
    band[0, 0, :] = 1  # holds image 0's two top pixels
    band[1, 2, :] = 1  # misses image 1's
    got = highlight_statistics(jnp.asarray(g), jnp.asarray(u), jnp.asarray(band))
    total = 4.0 + 39 * 0.02
    np.testing.assert_allclose(got["grad_share_top10u"], (4.0 + 3 * 0.02) / total, rtol=1e-6)
    np.testing.assert_allclose(got["grad_share_band"], (4.0 + 7 * 0.02) / total, rtol=1e-6)
    assert float(got["top10u_band_overlap"]) == 0.5
    assert got["band_fraction"] == np.float32(0.2)


def _tiny(method, **overrides):
    from puseg_jax.train import config as train_config
    from puseg_jax.train import steps

    config = make_config(
        method=method,
        **{"model.widths": (4, 8), "data.image_size": 16, "loss.num_samples": 2, **overrides},
    )
    info = train_config.validate_config(config)
    model = steps.create_model(config, info)
    host_state = jax.device_get(steps.create_train_state(config, info, model, jax.random.key(0)))
    return config, info, host_state


def _reference(config, info, host_state, batch, rng):
    """g = |dL/dmu| per pixel, U, band from jax.grad on one device, then the shares in NumPy."""
    from puseg_jax.train import steps

    def per_device(state, batch):
        noise_rng, dropout_rng, ids, extra = steps.step_inputs(
            state, batch, rng, config=config, label_mode=info.label_mode
        )
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        out, _ = state.apply_fn(
            variables,
            batch["image"],
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_rng},
            example_ids=ids,
        )
        out = dict(out, **extra)

        def loss(mu):
            return losses.compute_loss(
                config,
                dict(out, logits=mu),
                batch["mask"],
                noise_rng,
                state.step,
                info.label_mode,
                ids,
                parallel.AXIS,
            )[0]

        u = losses.uncertainty_map(config, out, noise_rng, info.label_mode, ids)
        return jax.grad(loss)(out["logits"]), u

    P = jax.sharding.PartitionSpec
    fn = jax.shard_map(
        per_device,
        mesh=parallel.create_mesh(1),
        in_specs=(P(), P(parallel.AXIS)),
        out_specs=P(parallel.AXIS),
        check_vma=False,
    )
    grad, u = (np.asarray(x, np.float64) for x in jax.jit(fn)(host_state, batch))
    g = np.abs(grad).sum(-1)
    band = np_band(batch["mask"], info.label_mode, info.num_outputs, config.loss.oracle_band_px)
    b = g.shape[0]
    k = int(round(0.1 * g[0].size))
    top = np.zeros(g.shape).reshape(b, -1)
    for n in range(b):
        top[n, np.argsort(-u[n].ravel(), kind="stable")[:k]] = 1
    top = top.reshape(g.shape)
    assert g.sum() > 0
    return {
        "grad_share_top10u": (top * g).sum() / g.sum(),
        "grad_share_band": (band * g).sum() / g.sum(),
        "top10u_band_overlap": (top * band).sum() / top.sum(),
        "band_fraction": band.mean(),
    }


DIAG_CASES = {
    "ours": ("ours", {"loss.lambda_max": 10.0, "loss.oracle_band_px": 1}),
    "oracle": ("ours", {"loss.uncertainty_source": "boundary_oracle", "loss.oracle_band_px": 2}),
    "erm": ("erm", {"loss.oracle_band_px": 1}),
}


@pytest.mark.parametrize("case", list(DIAG_CASES))
def test_diagnostics_by_hand_on_every_layout(case):
    from puseg_jax.train import diagnostics, steps

    method, overrides = DIAG_CASES[case]
    config, info, host_state = _tiny(method, **overrides)
    batch = random_batches(1, 16)[0]
    # Masks of 4x4 blocks: a band that is neither empty nor everything.
    blocks = np.random.RandomState(5).randint(0, 3, (8, 4, 4))
    batch["mask"] = np.kron(blocks, np.ones((1, 4, 4), np.int32)).astype(np.int32)
    rng = jax.random.key(1)
    ref = _reference(config, info, host_state, batch, rng)
    assert 0.05 < ref["band_fraction"] < 0.95 and 0 < ref["grad_share_top10u"] < 1
    fn = functools.partial(diagnostics.diagnostics_step, config=config, label_mode=info.label_mode)
    step_fn = functools.partial(steps.train_step, config=config, label_mode=info.label_mode)
    # Every layout for the oracle (and the train step beside it), 8 shards for the others.
    layouts = (("jit", 1), ("jit", 8), ("pmap", 8)) if case == "oracle" else (("jit", 8),)
    for strategy, devices in layouts:
        mesh = parallel.create_mesh(devices)
        diag = diagnostics.wrap_diagnostics_step(fn, mesh, strategy)
        sharded = parallel.shard_batch(batch, mesh, strategy)
        state = parallel.replicate(host_state, mesh, strategy)
        got = jax.device_get(diag(state, sharded, rng))
        assert set(got) == set(diagnostics.KEYS)
        for key, value in ref.items():
            # Exact counts are exact; shares of float sums to the summation order.
            tol = 0 if key == "band_fraction" else 1e-5
            np.testing.assert_allclose(
                got[key], value, rtol=tol, atol=tol, err_msg=f"{key} {strategy} {devices}"
            )
        if case != "oracle":
            continue
        # The train step after the diagnostics is the train step without them, bit for bit.
        train = parallel.wrap_train_step(step_fn, mesh, strategy)
        plain = parallel.replicate(host_state, mesh, strategy)
        new_plain, m_plain = train(plain, sharded, rng)
        new_diag, m_diag = train(state, sharded, rng)
        for a, b in zip(
            jax.tree.leaves((new_plain, m_plain)), jax.tree.leaves((new_diag, m_diag)), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tiny_run_with_the_oracle_an_onset_and_diagnostics(tmp_path, tfds_dir):
    """configs/test.py with the oracle, lambda 0 for the first half then 10, and diagnostics
    every 2 steps: the lambda schedule and the diagnostics land in metrics.jsonl."""
    from puseg_jax.train import trainer

    overrides = {
        "data.data_dir": tfds_dir,
        "loss.uncertainty_source": "boundary_oracle",
        "loss.onset_fraction": 0.5,
        "loss.lambda_max": 10.0,
        "loss.ramp_fraction": 0.0,
        "loss.diagnostics_every_steps": 2,
        "eval_every_steps": 0,
    }
    workdir = str(tmp_path / "run")
    trainer.train_and_evaluate(make_config(**overrides), workdir)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    lam = {r["step"]: r["train/lam"] for r in rows if "train/lam" in r}
    # Logged at 2 and 4: steps t = 1 (before the onset at t = 2) and t = 3.
    assert lam == {2: 0.0, 4: 10.0}
    diag = {r["step"]: r for r in rows if "train/grad_share_top10u" in r}
    assert sorted(diag) == [2, 4]
    for r in diag.values():
        for key in ("grad_share_top10u", "grad_share_band", "top10u_band_overlap", "band_fraction"):
            assert 0.0 < r[f"train/{key}"] < 1.0, key
