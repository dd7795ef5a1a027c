"""puseg_jax.metrics against reference implementations: medpy (HD95, ASSD, Dice) and MONAI (Dice).

Random shapes in 2-D and anisotropic 3-D, and the real masks in ../shared/data beside the
checkout (a handful of fundus masks, every prostate slice mask, the PROMISE12 NIfTI label), each
compared with an eroded, shifted or dilated copy of itself as the "prediction".
"""

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from puseg_jax import metrics
from puseg_jax.evaluators.records import Predictions
from tests.conftest import SHARED_DATA as DATA_DIR

medpy_binary = pytest.importorskip(
    "medpy.metric.binary", reason="medpy is the reference for HD95/ASSD (pip install medpy==0.5.2)"
)


TOLERANCE = 1e-6
NUM_FUNDUS_MASKS = 10


def _random_blob(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Smoothed noise above a random level: irregular, often several components, may touch the
    border, never empty."""
    field = ndimage.gaussian_filter(rng.random(shape), sigma=rng.uniform(1.0, 3.0))
    mask = field > np.quantile(field, rng.uniform(0.4, 0.9))
    if not mask.any():
        mask.flat[rng.integers(mask.size)] = True
    return mask


def _shift(mask: np.ndarray, offset: tuple[int, ...]) -> np.ndarray:
    """Translation that drops what leaves the array (np.roll would wrap it round)."""
    return ndimage.shift(mask.astype(np.uint8), offset, order=0, mode="constant") > 0


def _perturb(mask: np.ndarray, kind: str) -> np.ndarray:
    if kind == "eroded":
        return ndimage.binary_erosion(mask, iterations=2)
    if kind == "dilated":
        return ndimage.binary_dilation(mask, iterations=3)
    return _shift(mask, (4, -3) + (1,) * (mask.ndim - 2))


PERTURBATIONS = ("eroded", "shifted", "dilated")


def _assert_agrees_with_medpy(pred, gt, spacing, connectivity=1, check_directed=True):
    result = metrics.compute_case_metrics(pred, gt, spacing, connectivity)
    expected = {
        "dice": medpy_binary.dc(pred, gt),
        "hd95": medpy_binary.hd95(pred, gt, spacing, connectivity),
        "asd": medpy_binary.assd(pred, gt, spacing, connectivity),
    }
    for name, value in expected.items():
        assert abs(result[name] - value) <= TOLERANCE, (name, result[name], value)
    if not check_directed:  # two more full-size EDTs in medpy: skipped on the large real masks
        return
    # The directed means are medpy's asymmetric asd, both ways.
    pred_to_gt, gt_to_pred = metrics.surface_distances(pred, gt, spacing, connectivity)
    assert abs(pred_to_gt.mean() - medpy_binary.asd(pred, gt, spacing, connectivity)) <= TOLERANCE
    assert abs(gt_to_pred.mean() - medpy_binary.asd(gt, pred, spacing, connectivity)) <= TOLERANCE


# ---------------------------------------------------------------------------------------------
# Random shapes.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_random_2d_shapes_agree_with_medpy(seed):
    rng = np.random.default_rng(seed)
    for _ in range(8):
        shape = tuple(int(n) for n in rng.integers(8, 64, size=2))
        spacing = tuple(float(s) for s in rng.uniform(0.2, 2.0, size=2))
        pred, gt = _random_blob(rng, shape), _random_blob(rng, shape)
        _assert_agrees_with_medpy(pred, gt, spacing, connectivity=int(rng.integers(1, 3)))


@pytest.mark.parametrize("seed", range(3))
def test_random_anisotropic_3d_shapes_agree_with_medpy(seed):
    rng = np.random.default_rng(100 + seed)
    for _ in range(4):
        shape = (*(int(n) for n in rng.integers(16, 40, size=2)), int(rng.integers(4, 12)))
        # Thick slices along the last axis, as in prostate MRI.
        spacing = (*(float(s) for s in rng.uniform(0.4, 1.0, size=2)), float(rng.uniform(2, 4)))
        gt = _random_blob(rng, shape)
        pred = gt if rng.random() < 0.25 else _random_blob(rng, shape)
        _assert_agrees_with_medpy(pred, gt, spacing, connectivity=int(rng.integers(1, 4)))


def test_small_object_far_inside_a_large_array_agrees_with_medpy():
    # The bounding box is tiny here; distances must not depend on the cropped-away background.
    gt = np.zeros((120, 90, 10), dtype=bool)
    gt[60:70, 40:52, 4:7] = True
    pred = _shift(gt, (2, -1, 1))
    pred[64, 80, 2] = True  # a far-away false positive widens the box in two directions
    _assert_agrees_with_medpy(pred, gt, (0.6, 0.6, 3.6))


# ---------------------------------------------------------------------------------------------
# Real masks.
# ---------------------------------------------------------------------------------------------


def _load_png_mask(path: Path) -> np.ndarray:
    from PIL import Image

    array = np.asarray(Image.open(path))
    if array.ndim == 3:  # RGB with equal channels
        assert (array == array[..., :1]).all(), path
        array = array[..., 0]
    return array


@pytest.mark.real_data
def test_real_fundus_masks_agree_with_medpy():
    paths = sorted(DATA_DIR.glob("fundus/Domain*/*/ROIs/mask/*.png"))
    assert len(paths) >= NUM_FUNDUS_MASKS, f"expected fundus masks under {DATA_DIR / 'fundus'}"
    # Evenly spread over the sorted list, so several domains are covered.
    picks = [paths[i] for i in np.linspace(0, len(paths) - 1, NUM_FUNDUS_MASKS).astype(int)]
    for index, path in enumerate(picks):
        mask = _load_png_mask(path)
        assert set(np.unique(mask).tolist()) <= {0, 128, 255}, path
        for structure, gt in (("od", mask < 255), ("oc", mask == 0)):
            assert gt.any(), (path, structure)
            pred = _perturb(gt, PERTURBATIONS[index % len(PERTURBATIONS)])
            _assert_agrees_with_medpy(pred, gt, (1.0, 1.0), check_directed=index < 2)


@pytest.mark.real_data
def test_real_prostate_slice_masks_agree_with_medpy():
    paths = sorted(DATA_DIR.glob("prostate_slices/*/*/mask/*.png"))
    assert paths, f"expected prostate slice masks under {DATA_DIR / 'prostate_slices'}"
    for index, path in enumerate(paths):
        mask = _load_png_mask(path)
        assert set(np.unique(mask).tolist()) <= {0, 255}, path
        gt = mask > 0
        pred = _perturb(gt, PERTURBATIONS[index % len(PERTURBATIONS)])
        if not pred.any():  # medpy cannot score an empty mask; the convention is tested apart
            continue
        _assert_agrees_with_medpy(pred, gt, (0.6, 0.6), check_directed=index < 2)


@pytest.mark.real_data
def test_real_nifti_label_agrees_with_medpy():
    nibabel = pytest.importorskip("nibabel", reason="nibabel reads the NIfTI label")
    path = DATA_DIR / "prostate_nifti" / "promise12_case00" / "Case00_segmentation.nii.gz"
    image = nibabel.load(path)
    gt = np.asarray(image.dataobj) > 0
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    assert gt.ndim == 3 and gt.any()
    for kind in PERTURBATIONS:
        _assert_agrees_with_medpy(_perturb(gt, kind), gt, spacing, check_directed=kind == "eroded")


# ---------------------------------------------------------------------------------------------
# Evaluation at native resolution: network probabilities resampled to the released grid.
# ---------------------------------------------------------------------------------------------


def _native_case(native_mask, probs, native_spacing, net_spacing, slice_index=0, case="c"):
    """`predict_split`-like arrays of one example: probabilities on the network grid, the
    ground truth on its native grid."""
    from puseg_jax.data import transforms

    native = np.empty(1, object)
    native[0] = native_mask.astype(np.uint8)
    size = probs.shape[0]
    net_mask = transforms.resize(native_mask[..., None].astype(np.uint8), size, True)
    return {
        "case_id": np.array([case]),
        "slice_index": np.array([slice_index]),
        "probability": probs[None].astype(np.float32),
        "label": net_mask[None, ..., 0].astype(np.int32),
        "spacing": np.asarray([net_spacing], np.float32),
        "spacing_unit": np.array(["pixel" if native_spacing[0] == 1 else "mm"]),
        "native_shape": np.array([native_mask.shape], np.int32),
        "native_spacing": np.asarray([native_spacing], np.float32),
        "native_label": native,
    }


def _network_output(rng, net_mask, levels):
    """Plausible probabilities from a network-grid class mask: each structure (mask >= level)
    blurred, shifted by a pixel and noised."""
    channels = []
    for level in levels:
        p = ndimage.gaussian_filter((net_mask >= level).astype(np.float64), 1.5)
        p = np.roll(p, 1, axis=1) + 0.05 * rng.standard_normal(p.shape)
        channels.append(np.clip(p, 0, 1))
    return np.stack(channels, -1)


def _upsample(probs, shape):
    """Bilinear upsampling by JAX (half-pixel centres), independent of puseg_jax.resample."""
    import jax

    return np.asarray(jax.image.resize(probs, (*shape, probs.shape[-1]), "bilinear"))


@pytest.mark.real_data
def test_native_scoring_of_real_fundus_masks_agrees_with_medpy():
    from puseg_jax.core.datasets import get_dataset_info
    from puseg_jax.evaluators import scoring
    from tests.conftest import test_config

    info = get_dataset_info("fundus")
    config = test_config(**{"eval.largest_component": False})
    paths = sorted(DATA_DIR.glob("fundus/Domain*/test/ROIs/mask/*.png"))
    rng = np.random.default_rng(7)
    for path in [paths[i] for i in np.linspace(0, len(paths) - 1, 3).astype(int)]:
        stored = _load_png_mask(path)
        classes = (stored < 255).astype(np.uint8) + (stored == 0)  # 1 rim, 2 cup
        pred = Predictions(**_native_case(classes, np.zeros((128, 128, 2)), (1, 1, 1), (4, 4, 1)))
        pred.probability[0] = _network_output(rng, pred.label[0], (1, 2))
        (row,) = scoring.score_cases(pred, info, config, full=True)
        up = _upsample(pred.probability[0], classes.shape)
        disc = up[..., 0] > 0.5
        for name, p, gt in (
            ("OD", disc, classes >= 1),
            ("OC", disc & (up[..., 1] > 0.5), classes == 2),
        ):
            expected = {
                "dice": medpy_binary.dc(p, gt),
                "hd95": medpy_binary.hd95(p, gt, (1.0, 1.0)),
                "asd": medpy_binary.assd(p, gt, (1.0, 1.0)),
            }
            for metric, value in expected.items():
                assert abs(row[name][metric] - value) <= TOLERANCE, (path, name, metric)


def test_native_scoring_of_an_anisotropic_volume_agrees_with_medpy():
    from puseg_jax.core.datasets import get_dataset_info
    from puseg_jax.evaluators import scoring
    from tests.conftest import test_config

    info = get_dataset_info("synth_prostate")
    config = test_config(**{"eval.largest_component": False})
    rng = np.random.default_rng(8)
    gt = _random_blob(rng, (6, 45, 30)).astype(np.uint8)  # slices of 45x30 voxels
    native_spacing = (0.5, 0.8, 3.0)  # (row, col, slice) as stored
    parts = [
        _native_case(
            gt[k], np.zeros((16, 16, 2)), native_spacing, (45 / 16 * 0.5, 30 / 16 * 0.8, 3.0), k
        )
        for k in range(len(gt))
    ]
    pred = Predictions(**{key: np.concatenate([p[key] for p in parts]) for key in parts[0]})
    fg = _network_output(rng, pred.label.transpose(1, 2, 0), (1,))[..., 0].transpose(2, 0, 1)
    pred = pred.replace(probability=np.stack([1 - fg, fg], -1).astype(np.float32))
    (row,) = scoring.score_cases(pred, info, config, full=True)
    p = np.stack([_upsample(pk, gt.shape[1:]).argmax(-1) == 1 for pk in pred.probability])
    spacing = (3.0, 0.5, 0.8)  # array order (slice, row, col)
    assert abs(row["prostate"]["dice"] - medpy_binary.dc(p, gt)) <= TOLERANCE
    assert abs(row["prostate"]["hd95"] - medpy_binary.hd95(p, gt, spacing)) <= TOLERANCE
    assert abs(row["prostate"]["asd"] - medpy_binary.assd(p, gt, spacing)) <= TOLERANCE


# ---------------------------------------------------------------------------------------------
# MONAI.
# ---------------------------------------------------------------------------------------------


def test_dice_agrees_with_monai():
    monai_metrics = pytest.importorskip(
        "monai.metrics", reason="MONAI (and torch) are optional: pip install torch monai"
    )
    import torch

    rng = np.random.default_rng(7)
    for shape in ((6, 40, 48), (4, 24, 20, 8)):
        gt = np.stack([_random_blob(rng, shape[1:]) for _ in range(shape[0])])
        pred = np.stack([_random_blob(rng, shape[1:]) for _ in range(shape[0])])
        pred[0] = gt[0] = False  # both empty
        pred[1] = False  # missed structure
        gt[2] = False  # hallucinated structure
        # ignore_empty=False is MONAI's spelling of our convention (both empty -> 1, one -> 0).
        dice_metric = monai_metrics.DiceMetric(
            include_background=True, reduction="none", ignore_empty=False
        )
        expected = dice_metric(
            torch.from_numpy(pred[:, None].astype(np.float32)),
            torch.from_numpy(gt[:, None].astype(np.float32)),
        )
        expected = expected.numpy()[:, 0]
        ours = np.array([metrics.compute_dice(p, g) for p, g in zip(pred, gt, strict=True)])
        np.testing.assert_allclose(ours, expected, rtol=0, atol=TOLERANCE)
        np.testing.assert_array_equal(ours[:3], [1.0, 0.0, 0.0])
