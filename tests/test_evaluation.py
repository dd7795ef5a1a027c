"""Evaluation: no shortcuts (every slice predicted, images only on the devices, BatchNorm's
running statistics), 3-D re-stacking and scoring, reports, model selection, eval-only mode."""

import csv
import json
import os
import shutil

import numpy as np
import pytest

from puseg_jax.core.logging_utils import MetricWriter
from puseg_jax.evaluators import records
from puseg_jax.evaluators.records import Predictions
from tests.conftest import test_config as make_config

PROSTATE_KWARGS = {"num_train": 2, "num_test": 2, "num_slices": 6, "size": 32}


def _prostate_config(tfds_dir):
    return make_config(
        **{
            "data.data_dir": tfds_dir,
            "data.name": "synth_prostate",
            "data.source_domains": ("SiteA", "SiteB"),
            "data.target_domains": ("SiteC",),
            "data.builder_config": PROSTATE_KWARGS,
        }
    )


def _strict_json(path):
    def refuse(name):
        raise ValueError(f"{path}: non-standard JSON constant {name}")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


# ---------------------------------------------------------------------------------------------
# Host-side pieces on hand-made arrays.


def _volume_pred(rng, cases, num_slices=5, size=24, spacing=(0.5, 0.7, 3.0)):
    """Slices of `cases` volumes in shuffled order, as predict_split returns them."""
    rows = []
    for c in range(cases):
        volume = rng.random((num_slices, size, size, 1)).astype(np.float32)
        for s in range(num_slices):
            rows.append((f"case{c}", s, volume[s]))
    order = rng.permutation(len(rows))
    return Predictions(
        case_id=np.array([rows[i][0] for i in order]),
        slice_index=np.array([rows[i][1] for i in order]),
        image=np.stack([rows[i][2] for i in order]),
        spacing=np.tile(np.asarray(spacing, np.float32), (len(rows), 1)),
        spacing_unit=np.array(["mm"] * len(rows)),
    )


def test_group_cases_restacks_shuffled_slices():
    from puseg_jax.evaluators import scoring

    rng = np.random.default_rng(0)
    pred = _volume_pred(rng, cases=3)
    cases = scoring.group_cases(pred, volumetric=True)
    assert sorted(c for c, _ in cases) == ["case0", "case1", "case2"]
    for case_id, idx in cases:
        assert (pred.case_id[idx] == case_id).all()
        assert pred.slice_index[idx].tolist() == list(range(5))
    # 2-D: one case per example, in order.
    flat = scoring.group_cases(pred, volumetric=False)
    assert [i.tolist() for _, i in flat] == [[i] for i in range(len(pred.case_id))]
    pred.slice_index[pred.slice_index == 1] = 2
    with pytest.raises(ValueError, match="two examples of one slice"):
        scoring.group_cases(pred, volumetric=True)


def test_volumes_are_post_processed_and_scored_in_3d_with_spacing():
    from puseg_jax import metrics
    from puseg_jax.core.datasets import get_dataset_info
    from puseg_jax.evaluators import scoring

    info = get_dataset_info("synth_prostate")
    rng = np.random.default_rng(1)
    pred = _volume_pred(rng, cases=1, num_slices=6)
    d, h = 6, 24
    gt = np.zeros((d, h, h), bool)
    gt[1:4, 6:16, 5:15] = True
    fg = np.zeros((d, h, h), bool)
    fg[1:5, 7:17, 5:15] = True
    # A blob on a slice of its own: the largest component of that slice in 2-D, but not
    # connected to the gland in 3-D.
    fg[5, 2:5, 2:5] = True
    fg_prob = np.where(fg, 0.9, 0.1).astype(np.float32)
    ((_, idx),) = scoring.group_cases(pred, volumetric=True)
    inverse = np.argsort(idx)  # volume slice -> example row
    pred = pred.replace(
        probability=np.stack([1 - fg_prob, fg_prob], -1)[inverse],
        label=gt.astype(np.int32)[inverse],
    )

    # The arrays are on one grid here; native scoring is tested below.
    config = make_config(**{"eval.largest_component": True, "eval.resolution": "network"})
    masks = scoring.postprocess_case(pred.probability[idx], info, config)
    assert masks.shape == (1, d, h, h) and not masks[0, 5].any() and masks[0, 1:5].any()
    (row,) = scoring.score_cases(pred, info, config, full=True)
    # Stored spacing is (row, col, slice); a (D, H, W) volume is measured as (slice, row, col).
    expected = metrics.compute_case_metrics(masks[0], gt, spacing=(3.0, 0.5, 0.7))
    assert row["prostate"] == pytest.approx(expected)
    assert row["num_slices"] == d
    wrong_order = metrics.compute_case_metrics(masks[0], gt, spacing=(0.5, 0.7, 3.0))
    assert row["prostate"]["asd"] != pytest.approx(wrong_order["asd"])

    config.eval.largest_component = False
    masks = scoring.postprocess_case(pred.probability[idx], info, config)
    assert masks[0, 5].any()


def test_fundus_post_processing_is_the_dofe_protocol():
    from scipy import ndimage

    from puseg_jax import metrics
    from puseg_jax.core.datasets import get_dataset_info
    from puseg_jax.evaluators import scoring

    info = get_dataset_info("synth_fundus")
    rng = np.random.default_rng(2)
    probs = ndimage.gaussian_filter(rng.random((32, 32, 2)), (2, 2, 0))
    probs = (probs - probs.min()) / (probs.max() - probs.min())
    for threshold in (0.5, 0.75):
        config = make_config(**{"eval.threshold": threshold})
        masks = scoring.postprocess_case(probs[None], info, config)[:, 0]
        # DoFE: threshold the disc and keep its largest component; threshold the cup, restrict
        # it to the final disc, then keep its largest component.
        od = metrics.largest_connected_component(probs[..., 0] > threshold)
        oc = metrics.largest_connected_component((probs[..., 1] > threshold) & od)
        assert np.array_equal(masks[0], od) and np.array_equal(masks[1], oc)
        assert not (masks[1] & ~masks[0]).any()  # the cup lies in the disc
    # The cut is exercised: at 0.5 some of the cup's pixels lie outside the disc.
    assert ((probs[..., 1] > 0.5) & ~(probs[..., 0] > 0.5)).any()


def test_post_processing_restricts_the_cup_to_the_disc_by_hand():
    from puseg_jax.core.datasets import get_dataset_info
    from puseg_jax.evaluators import scoring

    info = get_dataset_info("synth_fundus")
    prob_od = np.zeros((8, 8))
    prob_od[1:6, 1:6] = 0.9
    prob_od[7, 7] = 0.9  # a stray disc pixel
    prob_oc = np.zeros((8, 8))
    prob_oc[2:4, 2:4] = 0.8
    prob_oc[5:8, 5:8] = 0.8  # partly outside the disc
    probs = np.stack([prob_od, prob_oc], -1)[None]  # one image, [1, H, W, 2]
    config = make_config(**{"eval.threshold": 0.5, "eval.largest_component": True})
    od, oc = scoring.postprocess_case(probs, info, config)[:, 0]
    assert od.dtype == bool and oc.dtype == bool
    assert od.sum() == 25 and not od[7, 7]
    assert not np.any(oc & ~od)
    # Of the cup, inside the disc: the 2x2 block and the single pixel (5, 5); LCC keeps the block.
    assert oc.sum() == 4 and oc[2:4, 2:4].all()
    # Without LCC the stray disc pixel stays, and so does the cup pixel on it.
    config.eval.largest_component = False
    od_raw, oc_raw = scoring.postprocess_case(probs, info, config)[:, 0]
    assert od_raw.sum() == 26 and oc_raw.sum() == 6 and oc_raw[7, 7]
    assert not np.any(oc_raw & ~od_raw)
    # A stricter threshold removes what lies between.
    config.eval.threshold = 0.85
    od, oc = scoring.postprocess_case(probs, info, config)[:, 0]
    assert od.sum() == 26 and not oc.any()


def test_uncertainty_quality_on_known_errors():
    from puseg_jax.core.datasets import get_dataset_info
    from puseg_jax.evaluators import scoring

    info = get_dataset_info("synth_prostate")
    mask = np.zeros((2, 16, 16), np.int32)
    mask[:, 4:12, 4:12] = 1
    fg = np.where(mask == 1, 0.8, 0.2)
    fg[:, 4, 4:12] = 0.3  # a misclassified boundary row
    probs = np.stack([1 - fg, fg], -1)
    error = (fg > 0.5) != (mask == 1)
    pred = Predictions(probability=probs, label=mask, uncertainty=error * 0.9 + 0.05)
    q = scoring.uncertainty_quality(pred, info, width=2)
    assert q["auroc_error"] == 1.0
    assert q["error_rate"] == pytest.approx(error.mean())
    assert q["u_boundary"] > q["u_interior"]
    assert len(q["reliability"]["bin_counts"]) == 15
    assert sum(q["reliability"]["bin_counts"]) == probs[..., 0].size


# ---------------------------------------------------------------------------------------------
# Native-resolution scoring on hand-made arrays.


def _native_pred(native_masks, probs, spacing_unit="pixel", native_spacing=(1.0, 1.0, 1.0)):
    """predict_split-like output of 2-D examples: network-grid probabilities, each example's
    class mask on its own native grid, and the nearest-resized mask on the network's grid."""
    from puseg_jax.data import transforms

    n, size = len(probs), probs.shape[1]
    native = np.empty(n, object)
    for i, m in enumerate(native_masks):
        native[i] = m.astype(np.uint8)
    net_spacing = [
        [m.shape[0] / size * native_spacing[0], m.shape[1] / size * native_spacing[1], 1.0]
        for m in native_masks
    ]
    return Predictions(
        case_id=np.array([f"case{i}" for i in range(n)]),
        slice_index=np.zeros(n, np.int32),
        probability=probs.astype(np.float32),
        uncertainty=np.abs(probs[..., 0] - 0.5).astype(np.float32),
        label=np.stack(
            [
                transforms.resize(m[..., None].astype(np.uint8), size, True)[..., 0]
                for m in native_masks
            ]
        ).astype(np.int32),
        spacing=np.asarray(net_spacing, np.float32),
        spacing_unit=np.array([spacing_unit] * n),
        native_shape=np.array([m.shape for m in native_masks], np.int32),
        native_spacing=np.tile(np.asarray(native_spacing, np.float32), (n, 1)),
        native_label=native,
    )


def _structures_to_classes(masks):
    """Nested structure masks [S, ...] (sigmoid) -> class mask (0, 1, .., S)."""
    return np.sum(masks, axis=0).astype(np.uint8)


def test_structure_thinner_than_a_network_pixel_scores_differently():
    from puseg_jax.core.datasets import get_dataset_info
    from puseg_jax.evaluators import scoring

    info = get_dataset_info("synth_fundus")
    # 64x64 released image, 16x16 network grid: one network pixel spans 4 released pixels.
    yy, xx = np.mgrid[:64, :64]
    native = np.where(np.hypot(yy - 31.5, xx - 31.5) < 22, 1, 0)
    native[12:52, 33:35] = 2  # a cup 2 released pixels wide
    pred = _native_pred([native], np.zeros((1, 16, 16, 2)))
    net = pred.label[0]
    assert (net == 2).any() and (net == 2).sum(axis=1).max() == 1  # one network pixel wide
    # The network predicts its own (nearest-resized) ground truth exactly.
    pred.probability[0] = np.stack([net >= 1, net == 2], -1) * 0.8 + 0.1
    rows = {}
    for resolution in ("network", "native"):
        config = make_config(**{"eval.resolution": resolution})
        (rows[resolution],) = scoring.score_cases(pred, info, config, full=True)
    assert rows["network"]["OC"]["dice"] == 1.0 and rows["network"]["OC"]["hd95"] == 0.0
    # Natively, a cup one network pixel wide cannot match a 2-pixel ground truth.
    oc = rows["native"]["OC"]
    assert oc["dice"] < 0.8 and 0 < oc["hd95"] < 4
    assert rows["native"]["OD"]["dice"] < 1.0


def test_native_scores_of_a_perfect_upsampled_prediction_are_exact():
    from scipy import ndimage

    from puseg_jax.core.datasets import get_dataset_info
    from puseg_jax.evaluators import scoring

    info = get_dataset_info("synth_fundus")
    rng = np.random.default_rng(3)
    # Smooth probabilities: one blob per channel, the cup's inside the disc's.
    yy, xx = np.mgrid[:16, :16]
    radius = np.hypot(yy - 7.5 + rng.uniform(-1, 1), xx - 7.5)
    probs = np.stack([1 / (1 + np.exp(radius - 6)), 1 / (1 + np.exp(radius - 3))], -1)
    probs = np.stack([probs, ndimage.shift(probs, (1, -1, 0), order=1, mode="nearest")])
    # Native grids of other sizes and aspect ratios than the network's.
    shapes = [(61, 61), (48, 72)]
    config = make_config()  # native by default
    native = [
        _structures_to_classes(
            scoring.postprocess_case(scoring.to_native(p, s)[None], info, config)[:, 0]
        )
        for p, s in zip(probs, shapes, strict=True)
    ]
    pred = _native_pred(native, probs)
    for row in scoring.score_cases(pred, info, config, full=True):
        for s in info.structures:
            assert row[s]["dice"] == 1.0 and row[s]["hd95"] == 0.0 and row[s]["asd"] == 0.0
            assert not row[s]["empty_gt"]
    # The same arrays on the network grid are not perfect: the ground truth there is resized.
    network = scoring.score_cases(
        pred, info, make_config(**{"eval.resolution": "network"}), full=True
    )
    assert min(r[s]["dice"] for r in network for s in info.structures) < 1.0


def test_native_volumes_stack_slices_and_use_the_native_spacing():
    from puseg_jax import metrics
    from puseg_jax.core.datasets import get_dataset_info
    from puseg_jax.evaluators import scoring

    info = get_dataset_info("synth_prostate")
    rng = np.random.default_rng(4)
    pred = _volume_pred(rng, cases=1, num_slices=4, size=16)
    ((_, idx),) = scoring.group_cases(pred, volumetric=True)
    yy, xx = np.mgrid[:16, :16]
    fg = np.stack([1 / (1 + np.exp(np.hypot(yy - 8, xx - 7) - r)) for r in (2, 4, 5, 3)])
    probs = np.stack([1 - fg, fg], -1)  # [D, 16, 16, 2] in slice order
    native_shape, native_spacing = (40, 30), (0.4, 0.5, 3.0)
    gt = np.stack([scoring.to_native(p, native_shape).argmax(-1) for p in probs])
    gt[0] = 0  # a slice without gland, hallucinated by the prediction
    inverse = np.argsort(idx)
    n = len(idx)
    pred = pred.replace(
        probability=probs[inverse].astype(np.float32),
        label=np.zeros((n, 16, 16), np.int32),  # not used natively
        native_shape=np.tile(native_shape, (n, 1)),
        native_spacing=np.tile(np.asarray(native_spacing, np.float32), (n, 1)),
        native_label=np.empty(n, object),
    )
    for j, i in enumerate(inverse):
        pred.native_label[j] = gt[i].astype(np.uint8)
    config = make_config(**{"eval.largest_component": False})
    (row,) = scoring.score_cases(pred, info, config, full=True)
    pm = np.stack([scoring.to_native(p, native_shape).argmax(-1) for p in probs]) == 1
    expected = metrics.compute_case_metrics(pm, gt == 1, spacing=(3.0, 0.4, 0.5))
    assert row["prostate"] == pytest.approx(expected)
    assert 0 < row["prostate"]["hd95"] and row["prostate"]["dice"] < 1
    # Native shapes that differ between the slices of one volume cannot be stacked.
    pred.native_shape[0] = (41, 30)
    with pytest.raises(ValueError, match="different native shapes"):
        scoring.score_cases(pred, info, config, full=True)


def test_slices_without_spacing_get_per_slice_distances():
    from puseg_jax.core.datasets import get_dataset_info
    from puseg_jax.evaluators import scoring

    info = get_dataset_info("prostate_slices")
    rng = np.random.default_rng(5)
    pred = _volume_pred(rng, cases=1, num_slices=3, size=8, spacing=(3.0, 3.0, 1.0))
    ((_, idx),) = scoring.group_cases(pred, volumetric=True)
    inverse = np.argsort(idx)
    gt = np.zeros((3, 24, 24), np.uint8)
    gt[1, 6:18, 6:18] = 1  # slice 0: nothing anywhere; slice 2: gland missed
    gt[2, 8:12, 8:12] = 1
    fg = np.zeros((3, 8, 8))
    fg[1, 2:6, 2:6] = 1
    probs = np.stack([1 - fg, fg], -1) * 0.8 + 0.1
    n = 3
    pred = pred.replace(
        probability=probs[inverse].astype(np.float32),
        label=np.zeros((n, 8, 8), np.int32),
        spacing_unit=np.array(["pixel"] * n),
        native_shape=np.tile((24, 24), (n, 1)),
        native_spacing=np.ones((n, 3), np.float32),
        uncertainty=np.zeros((n, 8, 8), np.float32),
        native_label=np.empty(n, object),
    )
    for j, i in enumerate(inverse):
        pred.native_label[j] = gt[i]
    config = make_config()
    (row,) = scoring.score_cases(pred, info, config, full=True)
    r = row["prostate"]
    assert (r["slices_scored"], r["slices_empty_pred"], r["slices_empty_gt"]) == (2, 1, 0)
    # Slice 1 is perfect; the missed slice 2 scores the slice diagonal (24 * sqrt 2).
    assert r["hd95"] == pytest.approx(24 * np.sqrt(2) / 2) and r["dice"] < 1
    res, _ = scoring.score_split(
        pred, info, config, {"domain": "X", "split": "test", "role": "target"}, step=1
    )
    assert res["distance"] == "2-D per slice, released pixels" and res["resolution"] == "native"
    assert res["structures"]["prostate"]["n_slices_empty_pred"] == 1
    assert res["uncertainty_resolution"] == "native"
    # On the network grid the volume is measured in 3-D, as before.
    net_config = make_config(**{"eval.resolution": "network"})
    net, _ = scoring.score_split(
        pred, info, net_config, {"domain": "X", "split": "test", "role": "target"}, step=1
    )
    assert (
        net["distance"]
        == "3-D on the network grid, released pixels, slice distance taken as 1 pixel"
    )
    assert "n_slices_scored" not in net["structures"]["prostate"]


def test_uncertainty_quality_native_equals_network_on_one_grid():
    from puseg_jax.core.datasets import get_dataset_info
    from puseg_jax.evaluators import scoring

    info = get_dataset_info("synth_fundus")
    rng = np.random.default_rng(6)
    masks = [
        np.where(rng.random((16, 16)) < 0.5, 1, 0) + (rng.random((16, 16)) < 0.2) for _ in range(3)
    ]
    pred = _native_pred(masks, rng.random((3, 16, 16, 2)))
    pred = pred.replace(uncertainty=rng.random((3, 16, 16)).astype(np.float32))
    network = scoring.uncertainty_quality(pred, info, 2, "network")
    native = scoring.uncertainty_quality(pred, info, 2, "native")
    reliability = native.pop("reliability")
    for key, value in network.pop("reliability").items():
        np.testing.assert_allclose(reliability[key], value, rtol=1e-12)
    assert native == pytest.approx(network, rel=1e-9)


def test_model_selection_refuses_target_domains():
    from puseg_jax.evaluators import reports

    def result(role, *dice):
        structures = {s: {"dice": {"mean": d}} for s, d in zip(("OD", "OC"), dice, strict=False)}
        return {"role": role, "structures": structures}

    # The mean over evaluators and structures: (0.5 + 0.25 + 0.75 + 0.9) / 4.
    score = reports.mean_dice(
        {"D1": result("source_val", 0.5, 0.25), "D2": result("source_val", 0.75, 0.9)}
    )
    assert score == pytest.approx(0.6)
    with pytest.raises(ValueError, match=r"source_val' evaluators only, not \['D3'\]"):
        reports.mean_dice({"D1": result("source_val", 0.5), "D3": result("target", 0.9)})
    with pytest.raises(ValueError, match="No source-validation results"):
        reports.mean_dice({})


# ---------------------------------------------------------------------------------------------
# Prediction through the real data path and device layout, with a stand-in network.


def _image_only_step(label_mode):
    """A stand-in eval step: probabilities from the image alone (foreground where it is bright)."""
    import jax
    import jax.numpy as jnp

    def step(state, batch, rng):
        del state, rng
        z = batch["image"][..., :1]
        fg = jax.nn.sigmoid(4 * z)
        probs = jnp.concatenate([1 - fg, fg], -1) if label_mode == "softmax" else fg
        return {"probs": probs, "uncertainty": 1 - jnp.abs(2 * fg[..., 0] - 1)}

    return step


def test_every_slice_is_predicted_from_the_image_alone(tfds_dir, tmp_path):
    import jax
    import jax.numpy as jnp

    from puseg_jax import parallel
    from puseg_jax.core.datasets import get_dataset_info
    from puseg_jax.data import prepare, sources
    from puseg_jax.evaluators import domains, predict

    config = _prostate_config(tfds_dir)
    info = get_dataset_info("synth_prostate")
    prepare.prepare_all(config, info)
    mesh = parallel.create_mesh(0)
    wrapped = parallel.wrap_eval_step(_image_only_step(info.label_mode), mesh, "jit")
    seen = []

    def spy(state, batch, rng):
        seen.append(sorted(batch))
        return wrapped(state, batch, rng)

    state = parallel.replicate(jnp.zeros(()), mesh, "jit")
    key = jax.random.key(0)
    pred = predict.predict_split(
        p_eval_step=spy,
        state=state,
        rng=key,
        config=config,
        info=info,
        data_dir=tfds_dir,
        mesh=mesh,
        strategy="jit",
        domain="SiteC",
        split="test",
    )
    source = sources.load_source(info, "SiteC", "test", tfds_dir, PROSTATE_KWARGS)
    n = len(source)
    assert n % config.eval.batch_size  # the last batch was padded
    assert seen == [["image"]] * -(-n // config.eval.batch_size)  # labels never reach devices
    assert len(pred.probability) == n and pred.index.tolist() == list(range(n))
    # Whole images at the network's input size, nothing cropped to the label's extent.
    assert pred.probability.shape == (n, 32, 32, 2) and pred.label.shape == (n, 32, 32)
    expected = {
        (str(source[i]["case_id"], "utf-8"), int(source[i]["slice_index"])) for i in range(n)
    }
    assert set(zip(pred.case_id.tolist(), pred.slice_index.tolist(), strict=True)) == expected

    # Slices without gland are predicted like any other, never zeroed.
    fg = 1 / (1 + np.exp(-4 * pred.image[..., 0]))
    np.testing.assert_allclose(pred.probability[..., 1], fg, rtol=1e-5, atol=1e-6)
    empty = ~pred.label.any(axis=(1, 2))
    assert empty.any() and (pred.probability[empty, ..., 1] > 0.5).any()

    # Volumes re-stacked and scored in 3-D, in mm; the reports of the evaluator.
    writer = MetricWriter(str(tmp_path))
    evals = {"SiteC": {"domain": "SiteC", "split": "test", "role": "target"}}
    (res,) = domains.evaluate_domains(
        p_eval_step=wrapped,
        state=state,
        rng=key,
        config=config,
        info=info,
        data_dir=tfds_dir,
        mesh=mesh,
        strategy="jit",
        evals=evals,
        workdir=str(tmp_path),
        step=7,
        writer=writer,
    ).values()
    writer.close()
    assert res["num_cases"] == PROSTATE_KWARGS["num_test"] and res["distance_unit"] == "mm"
    with open(tmp_path / "eval" / "SiteC" / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["num_slices"]) for r in rows] == [PROSTATE_KWARGS["num_slices"]] * 2


def test_batchnorm_uses_running_statistics():
    import functools

    import jax
    import optax

    from puseg_jax import parallel
    from puseg_jax.core.datasets import get_dataset_info
    from puseg_jax.train import steps

    config = make_config(**{"method": "erm", "parallel.num_devices": 1})
    info = get_dataset_info(config.data.name)
    model = steps.create_model(config, info)
    # Any parameters do; LLVM's optimisation of threefry dominates compiling a jitted init.
    init = jax.jit(
        functools.partial(model.init, train=False),
        compiler_options={"xla_backend_optimization_level": 0},
    )
    variables = init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    # Running statistics far from any batch's own, so that using the batch's would show.
    rng = np.random.default_rng(0)
    stats = jax.tree.map(
        lambda x: rng.uniform(0.5, 2.0, x.shape).astype(np.float32), variables["batch_stats"]
    )
    state = steps.TrainState.create(
        apply_fn=model.apply, params=variables["params"], batch_stats=stats, tx=optax.sgd(0.1)
    )
    mesh = parallel.create_mesh(1)
    step = functools.partial(steps.eval_step, config=config, label_mode=info.label_mode)
    p_eval_step = parallel.wrap_eval_step(step, mesh, "jit")
    replicated = parallel.replicate(state, mesh, "jit")

    def batch_stats_step(state, batch, rng):
        del rng
        out, _ = state.apply_fn(
            {"params": state.params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        return {"probs": jax.nn.sigmoid(out["logits"])}

    p_train_mode = parallel.wrap_eval_step(batch_stats_step, mesh, "jit")
    images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
    alone = np.repeat(images[:1], 4, axis=0)
    key = jax.random.key(2)

    def probs(fn, x):
        return np.asarray(
            fn(replicated, parallel.shard_batch({"image": x}, mesh, "jit"), key)["probs"]
        )

    np.testing.assert_allclose(
        probs(p_eval_step, images)[0], probs(p_eval_step, alone)[0], atol=1e-6
    )
    # The same comparison in training mode (batch statistics) does tell the batches apart.
    assert not np.allclose(probs(p_train_mode, images)[0], probs(p_train_mode, alone)[0], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# A trained workdir: reports, selection, eval-only mode.


def test_reports_of_the_trained_workdir(tiny_workdir):
    from puseg_jax.evaluators import reports

    config = make_config()
    summary = _strict_json(os.path.join(tiny_workdir, "summary.json"))
    for name, ev in summary["evals"].items():
        out = os.path.join(tiny_workdir, "eval", name)
        dom = _strict_json(os.path.join(out, "summary.json"))
        assert dom["distance_unit"] == "pixel" and dom["role"] == ev["role"]
        # Scored on the released 48x48 images, not the 32x32 network grid.
        assert dom["resolution"] == ev["resolution"] == "native"
        assert dom["distance"] == ev["distance"] == "2-D, released pixels"
        assert dom["uncertainty_resolution"] == ev["uncertainty_resolution"] == "native"
        for s in ("OD", "OC"):
            sm = dom["structures"][s]
            for m in ("dice", "hd95", "asd"):
                assert set(sm[m]) == {"mean", "std", "median", "n"}
                assert sm[m]["n"] == dom["num_cases"]
            assert {"n", "n_empty_pred", "n_empty_gt"} <= set(sm)
            assert ev[s]["dice"] == sm["dice"]["mean"]
        assert {"ece", "brier", "nll", "auroc_error", "u_boundary", "u_interior"} <= set(
            dom["uncertainty"]
        )
        with open(os.path.join(out, "per_case.csv")) as f:
            rows = list(csv.DictReader(f))
        assert tuple(rows[0]) == records.PER_CASE_COLUMNS
        assert len(rows) == 2 * dom["num_cases"]
        od = [float(r["dice"]) for r in rows if r["structure"] == "OD"]
        assert np.mean(od) == pytest.approx(dom["structures"]["OD"]["dice"]["mean"])
        with np.load(os.path.join(out, "predictions.npz")) as z:
            assert len(z["probability"]) == dom["num_examples"] == len(z["case_id"])
            assert {"image", "label", "uncertainty", "slice_index"} <= set(z.files)
            assert z["label"].shape[1:] == (config.data.image_size,) * 2
            assert (z["native_shape"] == 48).all() and str(z["resolution"]) == "native"
    # The target is scored at the end only; periodic evaluation (model selection) sees only the
    # source domains' validation splits.
    with open(os.path.join(tiny_workdir, "metrics.jsonl")) as f:
        lines = [json.loads(x) for x in f]
    periodic = [x for x in lines if x["step"] < config.num_train_steps]
    assert any("eval/source_val_mean_dice" in x for x in periodic)
    assert any("eval/Domain1/OD/dice" in x for x in periodic)
    assert not any(k.startswith("eval/Domain3") for x in periodic for k in x)
    final = [x for x in lines if "eval/Domain3/OD/dice" in x]
    assert final and final[-1]["eval/Domain3/OD/dice"] == summary["evals"]["Domain3"]["OD"]["dice"]

    table = reports.format_table([dict(summary, method="erm"), summary])
    body = table.splitlines()[2:]
    assert len(body) == 2 * len(summary["evals"])
    assert [line.split("|")[1].strip() for line in body] == ["erm"] * 3 + ["ours"] * 3
    assert body[2].split("|")[3].strip() == "target"  # targets last


def test_eval_only_reproduces_the_final_evaluation_on_one_device(tiny_workdir, tfds_dir, tmp_path):
    from puseg_jax.train import trainer

    workdir = str(tmp_path / "copy")
    shutil.copytree(tiny_workdir, workdir)
    shutil.rmtree(os.path.join(workdir, "eval"))
    trained = _strict_json(os.path.join(tiny_workdir, "summary.json"))
    config = make_config(**{"data.data_dir": tfds_dir, "parallel.num_devices": 1})
    summary = trainer.evaluate_only(config, workdir)
    assert summary["step"] == trained["step"] == config.num_train_steps
    for name, ev in trained["evals"].items():
        for s in ("OD", "OC"):
            for m in ("dice", "hd95", "asd"):
                assert summary["evals"][name][s][m] == pytest.approx(ev[s][m], abs=1e-6), (
                    name,
                    s,
                    m,
                )
    for name in trained["evals"]:
        assert os.path.isfile(os.path.join(workdir, "eval", name, "per_case.csv"))


# ---------------------------------------------------------------------------------------------
# A real NIfTI volume, scored on its original grid.


def test_nifti_cases_are_scored_on_their_original_grid(shared_data, tmp_path):
    import jax
    import jax.numpy as jnp
    import nibabel as nib
    import tensorflow_datasets as tfds

    from data_builders.prostate import prostate_builder
    from data_builders.prostate.prostate import display_to_file, load_nifti_pair
    from puseg_jax import metrics, parallel
    from puseg_jax.core.datasets import get_dataset_info
    from puseg_jax.data import sources
    from puseg_jax.evaluators import predict, scoring

    # The PROMISE12 case (128x128x64 voxels) as a one-case site: stored as 64 slices of
    # 384x384, predicted at 32x32, scored on 64 slices of 128x128 in mm.
    case = shared_data / "prostate_nifti" / "promise12_case00"
    site = tmp_path / "manual" / "UCL"
    site.mkdir(parents=True)
    for f in ("Case00.nii.gz", "Case00_segmentation.nii.gz"):
        (site / f).symlink_to(case / f)
    data_dir = str(tmp_path / "tfds")
    prostate_builder("UCL", data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual")),
        file_format="array_record",
    )
    config = make_config(
        **{"data.name": "prostate", "data.builder_config": {}, "data.context_slices": 1}
    )
    info = get_dataset_info("prostate")
    mesh = parallel.create_mesh(0)
    step = parallel.wrap_eval_step(_image_only_step(info.label_mode), mesh, "jit")
    state = parallel.replicate(jnp.zeros(()), mesh, "jit")
    pred = predict.predict_split(
        p_eval_step=step,
        state=state,
        rng=jax.random.key(0),
        config=config,
        info=info,
        data_dir=data_dir,
        mesh=mesh,
        strategy="jit",
        domain="UCL",
        split="train",
    )
    assert pred.probability.shape == (64, 32, 32, 2) and pred.label.shape == (64, 32, 32)
    assert (pred.native_shape == 128).all()

    ((case_id, idx),) = scoring.group_cases(pred, volumetric=True)
    probs, mask, spacing = scoring.scored_case(pred, idx, info, "native")
    _, labels, zooms = load_nifti_pair(case / "Case00.nii.gz", case / "Case00_segmentation.nii.gz")
    assert probs.shape == (64, 128, 128, 2)
    np.testing.assert_array_equal(mask, labels.transpose(2, 0, 1))  # the unresized label
    np.testing.assert_allclose(spacing, [zooms[2], zooms[0], zooms[1]], rtol=1e-6)  # mm

    res, (row,) = scoring.score_split(
        pred, info, config, {"domain": "UCL", "split": "train", "role": "target"}, step=1
    )
    assert (res["distance"], res["distance_unit"]) == ("3-D, mm", "mm")
    pm = scoring.postprocess_case(probs, info, config)[0]
    expected = metrics.compute_case_metrics(pm, mask == 1, spacing)
    assert row["prostate"] == pytest.approx(expected)
    assert row["num_slices"] == 64
    # The prediction maps back onto the file's own voxel grid, voxel for voxel.
    image = nib.load(case / "Case00.nii.gz")
    back = display_to_file(np.moveaxis(pm, 0, -1), image)
    assert back.shape == image.shape
    file_label = np.asarray(nib.load(case / "Case00_segmentation.nii.gz").dataobj) > 0
    np.testing.assert_array_equal(display_to_file(labels, image) > 0, file_label)

    # Training reads no native mask: its PNG stays undecoded.
    reader = sources.make_reader(info, config, "UCL", "train", data_dir)
    assert "native_mask" not in reader(0)
    assert isinstance(reader.source[0]["native_mask"], bytes)
