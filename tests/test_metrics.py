"""Hand-computed checks of puseg_jax.metrics (no reference library needed)."""

import math

import numpy as np
import pytest

from puseg_jax import metrics

# ---------------------------------------------------------------------------------------------
# Dice, HD95, ASD.
# ---------------------------------------------------------------------------------------------


def _block_and_centre():
    """A 3x3 ground-truth block and a prediction that is only its centre pixel.

    The block's surface (connectivity-1 erosion) is its 8 outer pixels; the centre is its own
    surface. Hand distances with unit spacing: centre -> block surface 1; block surface ->
    centre: 1 for the 4 edge pixels, sqrt(2) for the 4 corners.
    """
    gt = np.zeros((7, 7), dtype=bool)
    gt[2:5, 2:5] = True
    pred = np.zeros_like(gt)
    pred[3, 3] = True
    return pred, gt


def test_dice_by_hand():
    pred = np.zeros((4, 4), dtype=bool)
    gt = np.zeros((4, 4), dtype=bool)
    pred[0, :3] = True  # 3 pixels
    gt[0, 1:] = True  # 3 pixels, 2 shared
    assert metrics.compute_dice(pred, gt) == pytest.approx(2 * 2 / 6)
    assert metrics.compute_dice(gt, gt) == 1.0


def test_surface_metrics_by_hand_unit_spacing():
    pred, gt = _block_and_centre()
    pred_to_gt, gt_to_pred = metrics.surface_distances(pred, gt)
    np.testing.assert_allclose(pred_to_gt, [1.0])
    np.testing.assert_allclose(np.sort(gt_to_pred), [1, 1, 1, 1] + [math.sqrt(2)] * 4)
    hd95, asd = metrics.compute_surface_metrics(pred, gt)
    # Pooled: five 1s then four sqrt(2)s; the 95th percentile sits at rank 0.95 * 8 = 7.6,
    # between two sqrt(2)s.
    assert hd95 == pytest.approx(math.sqrt(2))
    assert asd == pytest.approx((5 + 4 * math.sqrt(2)) / 9)
    # Symmetric: swapping prediction and ground truth changes nothing.
    assert metrics.compute_surface_metrics(gt, pred) == pytest.approx((hd95, asd))


def test_surface_metrics_by_hand_anisotropic_spacing():
    pred, gt = _block_and_centre()
    # Rows 2 units apart, columns 1: the centre is 1 from the side pixels, the top and bottom
    # edge pixels are 2 from the centre, the corners sqrt(2**2 + 1) = sqrt(5).
    hd95, asd = metrics.compute_surface_metrics(pred, gt, spacing=(2.0, 1.0))
    assert hd95 == pytest.approx(math.sqrt(5))
    assert asd == pytest.approx((1 + 2 + 2 + 1 + 1 + 4 * math.sqrt(5)) / 9)


def test_surface_metrics_3d_anisotropic_single_voxels():
    pred = np.zeros((4, 5, 6), dtype=bool)
    gt = np.zeros_like(pred)
    pred[1, 2, 3] = True
    gt[3, 2, 1] = True  # 2 slices and 2 columns away
    hd95, asd = metrics.compute_surface_metrics(pred, gt, spacing=(3.0, 0.5, 0.5))
    expected = math.sqrt((2 * 3.0) ** 2 + (2 * 0.5) ** 2)
    assert hd95 == pytest.approx(expected)
    assert asd == pytest.approx(expected)


def test_surface_of_mask_touching_the_border():
    # Voxels beyond the array are background, so pixels on the border are surface.
    gt = np.zeros((5, 4), dtype=bool)
    gt[:3, :] = True  # rows 0-2, full width: only (1, 1) and (1, 2) are interior
    pred = gt.copy()
    pred[2, :] = False  # rows 0-1: all 8 pixels touch the border, all surface
    pred_to_gt, gt_to_pred = metrics.surface_distances(pred, gt)
    # pred -> gt: 0 except the two pixels over gt's interior, 1 row from gt's row-2 surface.
    np.testing.assert_allclose(pred_to_gt, [0, 0, 0, 0, 0, 1, 1, 0])
    # gt -> pred: 0 for rows 0-1, 1 for the 4 pixels of row 2.
    np.testing.assert_allclose(gt_to_pred, [0] * 6 + [1] * 4)
    assert metrics.compute_surface_metrics(pred, gt) == pytest.approx((1.0, 6 / 18))


def test_both_empty_convention():
    empty = np.zeros((6, 8), dtype=bool)
    result = metrics.compute_case_metrics(empty, empty, spacing=(0.5, 0.5))
    assert result == {"dice": 1.0, "hd95": 0.0, "asd": 0.0, "empty_pred": True, "empty_gt": True}


@pytest.mark.parametrize("empty_side", ["pred", "gt"])
def test_one_empty_convention_is_the_diagonal(empty_side):
    full = np.zeros((6, 8), dtype=bool)
    full[2:4, 3:5] = True
    empty = np.zeros_like(full)
    pred, gt = (empty, full) if empty_side == "pred" else (full, empty)
    result = metrics.compute_case_metrics(pred, gt, spacing=(0.5, 0.5))
    # 6 x 8 pixels of 0.5 mm: a 3 x 4 mm image, 5 mm diagonal.
    assert result == {
        "dice": 0.0,
        "hd95": 5.0,
        "asd": 5.0,
        "empty_pred": empty_side == "pred",
        "empty_gt": empty_side == "gt",
    }


def test_empty_mask_distance_3d_and_validation():
    assert metrics.empty_mask_distance((2, 3, 6)) == pytest.approx(7.0)
    assert metrics.empty_mask_distance((2, 3, 6), (2.0, 1.0, 1.0)) == pytest.approx(math.sqrt(61))
    with pytest.raises(ValueError, match="one value per axis"):
        metrics.empty_mask_distance((2, 3), (1.0, 1.0, 1.0))


def test_case_metrics_flags_and_types():
    pred, gt = _block_and_centre()
    result = metrics.compute_case_metrics(pred, gt)
    assert result["dice"] == pytest.approx(2 / 10)
    assert result["empty_pred"] is False and result["empty_gt"] is False
    assert all(type(result[k]) is float for k in ("dice", "hd95", "asd"))


def test_surface_distances_reject_empty_and_mismatched():
    pred, gt = _block_and_centre()
    with pytest.raises(ValueError, match="non-empty"):
        metrics.surface_distances(np.zeros_like(gt), gt)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.compute_case_metrics(pred, gt[:5])


# ---------------------------------------------------------------------------------------------
# Post-processing.
# ---------------------------------------------------------------------------------------------


def test_largest_connected_component_2d():
    mask = np.zeros((6, 8), dtype=bool)
    mask[0, 0:3] = True  # 3 pixels
    mask[3:5, 4:7] = True  # 6 pixels
    mask[2, 3] = True  # touches the big blob only diagonally: its own component
    kept = metrics.largest_connected_component(mask)
    expected = np.zeros_like(mask)
    expected[3:5, 4:7] = True
    np.testing.assert_array_equal(kept, expected)
    # With connectivity 2 the diagonal pixel joins the big blob.
    assert metrics.largest_connected_component(mask, connectivity=2).sum() == 7


def test_largest_connected_component_3d_connects_across_slices():
    mask = np.zeros((3, 5, 5), dtype=bool)
    mask[0, 0, 0:2] = True
    mask[1, 0, 0] = True  # below mask[0, 0, 0]: same component, 3 voxels
    mask[2, 3:5, 3:5] = True  # 4 voxels, the largest
    kept = metrics.largest_connected_component(mask)
    assert kept.sum() == 4 and kept[2, 3:5, 3:5].all()


def test_largest_connected_component_empty_and_ties():
    empty = np.zeros((4, 4), dtype=bool)
    assert not metrics.largest_connected_component(empty).any()
    tie = np.zeros((4, 4), dtype=bool)
    tie[0, 0] = tie[3, 3] = True
    kept = metrics.largest_connected_component(tie)
    assert kept[0, 0] and not kept[3, 3]  # first in raster order


# ---------------------------------------------------------------------------------------------
# Summaries.
# ---------------------------------------------------------------------------------------------


def test_summarize_population_std():
    summary = metrics.summarize([1.0, 2.0, 3.0, 4.0])
    assert summary == pytest.approx({"mean": 2.5, "std": math.sqrt(1.25), "median": 2.5, "n": 4})
    empty = metrics.summarize([])
    assert empty["n"] == 0 and math.isnan(empty["mean"])


def test_summarize_cases_counts_empty_masks():
    full = np.zeros((4, 4), dtype=bool)
    full[1:3, 1:3] = True
    empty = np.zeros_like(full)
    cases = [
        {"case_id": "a", "od": metrics.compute_case_metrics(full, full)},
        {"case_id": "b", "od": metrics.compute_case_metrics(empty, full)},
        {"case_id": "c", "od": metrics.compute_case_metrics(empty, empty)},
    ]
    summary = metrics.summarize_cases(cases)
    assert list(summary) == ["od"]
    od = summary["od"]
    assert od["n"] == 3 and od["n_empty_pred"] == 2 and od["n_empty_gt"] == 1
    assert od["dice"] == pytest.approx(
        {"mean": 2 / 3, "std": math.sqrt(2) / 3, "median": 1.0, "n": 3}
    )
    assert od["hd95"]["median"] == 0.0
    assert od["hd95"]["mean"] == pytest.approx(math.sqrt(32) / 3)


# ---------------------------------------------------------------------------------------------
# Uncertainty quality.
# ---------------------------------------------------------------------------------------------


def _calibration(confidence, correct, n_bins=15):
    return metrics.calibration_from_sums(metrics.calibration_sums(confidence, correct, n_bins))


def test_calibration_by_hand():
    confidence = np.array([0.95, 0.95, 0.85, 0.5, 0.5, 0.6])
    correct = np.array([1, 1, 0, 1, 0, 1], dtype=bool)
    result = _calibration(confidence, correct, n_bins=5)
    np.testing.assert_allclose(result["bin_edges"], [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    # Bins are closed on the right: 0.6 lands in (0.4, 0.6] with the two 0.5s.
    np.testing.assert_array_equal(result["bin_counts"], [0, 0, 3, 0, 3])
    np.testing.assert_allclose(result["bin_confidence"][[2, 4]], [1.6 / 3, 2.75 / 3])
    np.testing.assert_allclose(result["bin_accuracy"][[2, 4]], [2 / 3, 2 / 3])
    assert np.isnan(result["bin_accuracy"][0])
    # |2/3 - 1.6/3| * 3/6 + |2/3 - 2.75/3| * 3/6
    assert result["ece"] == pytest.approx((0.4 / 3 + 0.75 / 3) / 2)


def test_calibration_sums_of_parts_give_the_calibration_of_the_union():
    rng = np.random.default_rng(3)
    confidence, correct = rng.random(500), rng.random(500) < 0.7
    parts = [
        metrics.calibration_sums(confidence[s], correct[s], 10)
        for s in np.split(np.arange(500), [120, 380])
    ]
    added = {k: sum(p[k] for p in parts) for k in parts[0]}
    whole = _calibration(confidence, correct, 10)
    got = metrics.calibration_from_sums(added)
    np.testing.assert_array_equal(got["bin_counts"], whole["bin_counts"])
    assert got["ece"] == pytest.approx(whole["ece"], rel=1e-12)


def test_calibration_perfect_and_invalid():
    confidence = np.array([1.0, 1.0, 0.0])
    assert _calibration(confidence, [1, 1, 0])["ece"] == 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        _calibration([1.2], [1])


@pytest.mark.parametrize("n_bins", [7, 10, 15])
def test_calibration_bins_are_right_closed_at_float_edges(n_bins):
    # Values on and one ulp either side of every edge: the fast binning must agree with a
    # binary search on the edges.
    edges = np.arange(n_bins + 1) / n_bins
    values = np.concatenate([edges, np.nextafter(edges, 2.0), np.nextafter(edges, -1.0)])
    values = np.clip(np.concatenate([values, np.random.default_rng(1).random(1000)]), 0.0, 1.0)
    expected = np.bincount(np.searchsorted(edges[1:-1], values), minlength=n_bins)
    result = _calibration(values, np.ones(values.size, dtype=bool), n_bins=n_bins)
    np.testing.assert_array_equal(result["bin_counts"], expected)


def test_brier_and_nll_binary_by_hand():
    probs = np.array([0.8, 0.3])
    target = np.array([True, False])
    assert metrics.brier_score(probs, target) == pytest.approx((0.04 + 0.09) / 2)
    assert metrics.nll(probs, target) == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)
    # A certain mistake costs -log(eps), not infinity.
    assert metrics.nll(np.array([0.0]), np.array([True])) == pytest.approx(-math.log(1e-7))


def test_brier_and_nll_softmax_by_hand():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)
    labels = np.array([0, 1])
    assert metrics.brier_score(probs, labels) == pytest.approx(((0.09 + 0.04 + 0.01) + 1.46) / 2)
    assert metrics.nll(probs, labels) == pytest.approx(-(math.log(0.7) + math.log(0.1)) / 2)
    # Two-class softmax scores twice the binary form of the same prediction.
    p_fg = np.array([0.8, 0.3])
    two_class = np.stack([1 - p_fg, p_fg], axis=-1)
    assert metrics.brier_score(two_class, np.array([1, 0])) == pytest.approx(
        2 * metrics.brier_score(p_fg, np.array([True, False]))
    )
    with pytest.raises(ValueError, match="integer labels"):
        metrics.brier_score(probs, np.array([0.0, 1.0]))


def _auroc_by_pairs(scores, labels):
    pos, neg = scores[labels], scores[~labels]
    diff = pos[:, None] - neg[None, :]
    return (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size


def test_auroc_ties_match_pair_count():
    rng = np.random.default_rng(0)
    for _ in range(5):
        scores = rng.integers(0, 6, size=300).astype(np.float32)  # many ties
        labels = rng.random(300) < 0.3
        assert metrics.auroc(scores, labels) == pytest.approx(
            _auroc_by_pairs(scores, labels), abs=1e-12
        )
    assert metrics.auroc(np.array([0.1, 0.5, 0.5, 0.9]), np.array([0, 1, 0, 1])) == 0.875
    assert metrics.auroc(np.ones(4), np.array([0, 1, 0, 1])) == 0.5


def test_auroc_one_class_is_nan():
    assert math.isnan(metrics.auroc(np.arange(4.0), np.zeros(4, dtype=bool)))
    assert math.isnan(metrics.auroc(np.arange(4.0), np.ones(4, dtype=bool)))


def test_boundary_band_by_hand():
    gt = np.zeros((7, 7), dtype=bool)
    gt[2:5, 2:5] = True
    # Width 1: the 8 outer pixels of the block and the 12 background pixels facing its sides.
    band1 = metrics.boundary_band(gt, width=1)
    assert band1.sum() == 20 and not band1[3, 3] and not band1[1, 1]
    # Width 2: the whole block (its centre is 2 from the background), two rows of 3 on each
    # side, and the 4 diagonal neighbours of the corners.
    band2 = metrics.boundary_band(gt, width=2)
    assert band2.sum() == 9 + 24 + 4 and band2[1, 1] and not band2[0, 1]


def test_boundary_band_is_per_slice():
    volume = np.zeros((3, 7, 7), dtype=bool)
    volume[0, 2:5, 2:5] = True
    volume[2] = True  # all foreground: no boundary in that slice
    band = metrics.boundary_band(volume, width=1)
    np.testing.assert_array_equal(band[0], metrics.boundary_band(volume[0], width=1))
    assert not band[1].any() and not band[2].any()
