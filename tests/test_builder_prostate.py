"""Tests of the `prostate` builder: real slices, the real NIfTI case and generated volumes."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from scipy import ndimage

from data_builders.common import DataError
from data_builders.prostate import Prostate, ProstateConfig, prostate_builder
from data_builders.prostate.prostate import (
    SITE_SOURCES,
    binarize_labels,
    display_to_file,
    load_nifti_pair,
    normalize_intensity,
    split_cases,
)
from tests.conftest import SHARED_DATA

tfds.disable_progress_bar()


SLICES_DIR = SHARED_DATA / "prostate_slices"
NIFTI_CASE = SHARED_DATA / "prostate_nifti" / "promise12_case00"
SITES = list(SITE_SOURCES)


def build(builder: tfds.core.DatasetBuilder, manual_dir: Path):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)),
        file_format="array_record",
    )
    return builder.as_data_source()


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)


def ras_phantom(shape=(20, 30, 4)) -> tuple[np.ndarray, np.ndarray]:
    """A volume whose every voxel is distinct, and a label box off centre (in RAS voxel order)."""
    volume = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    labels = np.zeros(shape, np.uint8)
    labels[2:6, 20:27, 1:3] = 1
    return volume, labels


# ------------------------------------------------------------------ real slice release


@pytest.fixture(scope="session")
def slices_data_dir(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("tfds_prostate_slices")
    for site in SITES:
        # The I2CVB train folder has an image without mask and a mask without image.
        builder = prostate_builder(site, data_dir, layout="slices", skip_unpaired=(site == "I2CVB"))
        build(builder, SLICES_DIR)
    return data_dir


@pytest.mark.real_data
@pytest.mark.parametrize("site", SITES)
def test_real_slice_sites(slices_data_dir, site):
    sources = tfds.data_source(f"prostate/{site}_slices", data_dir=slices_data_dir)
    assert set(sources) == {"train", "test"}
    expected_train = [1, 2] if site == "I2CVB" else [0, 1, 2]
    for split, indices in (("train", expected_train), ("test", [0, 1, 2])):
        examples = [sources[split][i] for i in range(len(sources[split]))]
        assert [int(e["slice_index"]) for e in examples] == indices
        for e in examples:
            name = f"00_{int(e['slice_index']):02d}.png"
            assert e["case_id"] == b"00" and e["num_slices"] == len(indices)
            assert e["image"].shape == (384, 384, 1) and e["mask"].shape == (384, 384, 1)
            stored = np.asarray(Image.open(SLICES_DIR / site / split / "image" / name))
            np.testing.assert_array_equal(e["image"][..., 0], stored)
            stored_mask = np.asarray(Image.open(SLICES_DIR / site / split / "mask" / name))
            # The release draws the gland black (0) on white (255).
            np.testing.assert_array_equal(e["mask"][..., 0], stored_mask == 0)
            assert set(np.unique(e["mask"])) == {0, 1}
            # A whole gland is one compact region covering a few percent of the slice, darker or
            # brighter than its surroundings but never most of the field of view.
            gland = e["mask"][..., 0].astype(bool)
            assert 0.002 < gland.mean() < 0.06
            assert ndimage.label(gland)[1] == 1
            ys, xs = np.nonzero(gland)
            assert 96 < ys.mean() < 288 and 96 < xs.mean() < 288  # central part of the slice
            np.testing.assert_array_equal(e["spacing"], np.ones(3, np.float32))
            assert e["spacing_unit"] == b"pixel" and e["domain"] == f"{site}_slices".encode()
            # The stored 384x384 slices are the release's own grid: no native copy.
            assert "native_mask" not in e


@pytest.mark.real_data
def test_real_i2cvb_slices_fail_without_skip_unpaired(tmp_path):
    with pytest.raises(DataError, match="skip_unpaired=True") as error:
        build(prostate_builder("I2CVB", tmp_path, layout="slices"), SLICES_DIR)
    assert "I2CVB/train/image/00_03.png" in str(error.value)
    assert "I2CVB/train/mask/00_00.png" in str(error.value)


# ------------------------------------------------------------------ real NIfTI case


@pytest.fixture(scope="session")
def nifti_site(tmp_path_factory) -> tuple[Path, Path]:
    """The real PROMISE12 case as UCL/Case00 in the SAML layout, plus a generated Case01."""
    manual = tmp_path_factory.mktemp("saml_manual")
    site = manual / "UCL"
    site.mkdir()
    (site / "Case00.nii.gz").symlink_to(NIFTI_CASE / "Case00.nii.gz")
    # Real releases spell the label suffix both ways.
    (site / "Case00_Segmentation.nii.gz").symlink_to(NIFTI_CASE / "Case00_segmentation.nii.gz")
    volume, labels = ras_phantom()
    save_nifti(site / "Case01.nii.gz", volume, np.diag([0.5, 0.6, 3.0, 1.0]))
    save_nifti(site / "Case01_segmentation.nii.gz", labels, np.diag([0.5, 0.6, 3.0, 1.0]))
    data_dir = tmp_path_factory.mktemp("tfds_prostate_nifti")
    build(prostate_builder("UCL", data_dir), manual)
    return manual, data_dir


@pytest.mark.real_data
def test_real_nifti_case_slices_labels_spacing(nifti_site):
    manual, data_dir = nifti_site
    sources = tfds.data_source("prostate/UCL", data_dir=data_dir)
    assert {k: len(v) for k, v in sources.items()} == {"train": 64, "validation": 4}
    train = [sources["train"][i] for i in range(64)]
    assert {e["case_id"] for e in train} == {b"Case00"}
    assert [int(e["slice_index"]) for e in train] == list(range(64))
    assert all(e["num_slices"] == 64 and e["spacing_unit"] == b"mm" for e in train)

    header = nib.as_closest_canonical(nib.load(NIFTI_CASE / "Case00.nii.gz")).header
    zx, zy, zz = header.get_zooms()
    expected_spacing = np.array([zy * 128 / 384, zx * 128 / 384, zz], np.float32)
    np.testing.assert_allclose(train[0]["spacing"], expected_spacing, rtol=1e-6)
    np.testing.assert_allclose(train[0]["spacing"], [0.3646, 0.3646, 1.6156], atol=1e-4)

    images = np.stack([e["image"][..., 0] for e in train], axis=-1)
    masks = np.stack([e["mask"][..., 0] for e in train], axis=-1)
    assert images.shape == (384, 384, 64) and images.min() == 0 and images.max() == 255
    assert set(np.unique(masks)) == {0, 1}
    # Nearest-neighbour upsampling by exactly 3 repeats every label voxel as a 3x3 block.
    _, labels, _ = load_nifti_pair(
        manual / "UCL/Case00.nii.gz", manual / "UCL/Case00_Segmentation.nii.gz"
    )
    np.testing.assert_array_equal(masks, labels.repeat(3, axis=0).repeat(3, axis=1))
    # Each slice's label on the volume's own 128x128 grid, with the header's spacing, for
    # scoring at the original resolution.
    native = np.stack([e["native_mask"][..., 0] for e in train], axis=-1)
    np.testing.assert_array_equal(native, labels)
    np.testing.assert_allclose(train[0]["native_spacing"], [zy, zx, zz], rtol=1e-6)
    assert (
        masks.sum()
        == 9 * np.asarray(nib.load(NIFTI_CASE / "Case00_segmentation.nii.gz").dataobj).sum()
    )


@pytest.mark.real_data
def test_real_nifti_no_patient_in_two_splits(nifti_site):
    _, data_dir = nifti_site
    sources = tfds.data_source("prostate/UCL", data_dir=data_dir)
    cases = {
        split: {source[i]["case_id"] for i in range(len(source))}
        for split, source in sources.items()
    }
    assert cases == {"train": {b"Case00"}, "validation": {b"Case01"}}
    assert not cases["train"] & cases["validation"]


# ------------------------------------------------------------------ generated volumes


def test_split_cases_every_fifth_by_patient():
    cases = [f"Case{i:02d}" for i in range(30)]
    train, validation = split_cases(list(reversed(cases)))
    assert validation == ["Case04", "Case09", "Case14", "Case19", "Case24", "Case29"]
    assert sorted(train + validation) == cases and not set(train) & set(validation)
    assert [len(split_cases(cases[:n])[1]) for n in (1, 2, 4, 5, 12, 13, 19)] == [
        0,
        1,
        1,
        1,
        2,
        2,
        3,
    ]
    assert split_cases(["b", "a"]) == (["a"], ["b"])


def test_orientation_is_canonical_whatever_the_stored_axes(tmp_path):
    """The same anatomy stored RAS or LPS with swapped axes gives the same slices."""
    volume, labels = ras_phantom()
    ras = np.diag([0.5, 0.6, 3.0, 1.0])
    save_nifti(tmp_path / "ras.nii.gz", volume, ras)
    save_nifti(tmp_path / "ras_seg.nii.gz", labels, ras)
    # LPS storage: flip x and y, then store (y, x, z) voxel order.
    lps_affine = np.array(
        [[0, -0.5, 0, 9.5], [-0.6, 0, 0, 17.4], [0, 0, 3.0, 0], [0, 0, 0, 1]], dtype=float
    )
    lps = lambda a: np.flip(a, axis=(0, 1)).transpose(1, 0, 2)  # noqa: E731
    save_nifti(tmp_path / "lps.nii.gz", lps(volume), lps_affine)
    save_nifti(tmp_path / "lps_seg.nii.gz", lps(labels), lps_affine)

    a_img, a_lab, a_zoom = load_nifti_pair(tmp_path / "ras.nii.gz", tmp_path / "ras_seg.nii.gz")
    b_img, b_lab, b_zoom = load_nifti_pair(tmp_path / "lps.nii.gz", tmp_path / "lps_seg.nii.gz")
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert a_zoom == pytest.approx(b_zoom) and a_zoom == pytest.approx((0.6, 0.5, 3.0))
    # Rows run anterior -> posterior, columns patient right -> left.
    assert a_img.shape == (30, 20, 4)
    assert a_img[0, 0, 0] == volume[19, 29, 0]  # Most anterior, most right voxel.
    # A prediction in this layout goes back to each file's own voxel order.
    for name, stored in (("ras", volume), ("lps", lps(volume))):
        image = nib.load(tmp_path / f"{name}.nii.gz")
        np.testing.assert_array_equal(display_to_file(a_img, image), stored)
    with pytest.raises(ValueError, match="does not belong"):
        display_to_file(a_img[:, :10], nib.load(tmp_path / "ras.nii.gz"))


def test_generated_site_resize_spacing_and_intensity(tmp_path):
    volume, labels = ras_phantom()
    affine = np.diag([0.5, 0.6, 3.0, 1.0])
    manual = tmp_path / "manual"
    for case in ("Case00", "Case01"):
        save_nifti(manual / "MyHospital" / f"{case}.nii.gz", volume, affine)
        save_nifti(manual / "MyHospital" / f"{case}_segmentation.nii.gz", labels, affine)
    config = ProstateConfig(name="MyHospital_small", site="MyHospital", size=60)
    sources = build(Prostate(data_dir=tmp_path / "data", config=config), manual)
    assert {k: len(v) for k, v in sources.items()} == {"train": 4, "validation": 4}
    example = sources["validation"][1]
    assert example["case_id"] == b"Case01" and example["slice_index"] == 1
    assert example["image"].shape == (60, 60, 1) and example["domain"] == b"MyHospital_small"
    # Rows come from the 30 y voxels of 0.6 mm, columns from the 20 x voxels of 0.5 mm.
    np.testing.assert_allclose(example["spacing"], [0.6 * 30 / 60, 0.5 * 20 / 60, 3.0])
    # Label box: y voxels 20..26 -> rows 3..9 (anterior first) -> 6..19 at 2x; x voxels 2..5
    # -> cols 14..17 -> 42..53 at 3x.
    rows, cols = np.nonzero(example["mask"][..., 0])
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (6, 19, 42, 53)
    # On the volume's own 30x20 grid: rows 3..9, cols 14..17, voxels of (0.6, 0.5, 3.0) mm.
    rows, cols = np.nonzero(example["native_mask"][..., 0])
    assert example["native_mask"].shape == (30, 20, 1)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (3, 9, 14, 17)
    np.testing.assert_allclose(example["native_spacing"], [0.6, 0.5, 3.0], rtol=1e-6)


def test_prostate_builder_names_and_registered_configs(tmp_path):
    names = sorted(c.name for c in Prostate.BUILDER_CONFIGS)
    assert names == sorted(SITES + [f"{s}_slices" for s in SITES])
    assert prostate_builder("BIDMC", tmp_path).builder_config.layout == "nifti"
    assert prostate_builder("BIDMC", tmp_path, layout="slices").builder_config.name == (
        "BIDMC_slices"
    )
    custom = prostate_builder("Clinic", tmp_path, layout="slices")
    assert (custom.builder_config.name, custom.builder_config.site) == ("Clinic_slices", "Clinic")
    with pytest.raises(ValueError, match="registered config"):
        prostate_builder("Clinic", tmp_path, name="BIDMC")


def test_normalize_intensity_clips_percentiles():
    volume = np.arange(1000, dtype=np.float32)
    scaled = normalize_intensity(volume)
    low, high = np.percentile(volume, [0.5, 99.5])
    assert scaled.min() == 0 and scaled.max() == 1
    np.testing.assert_allclose(scaled[500], (500 - low) / (high - low), rtol=1e-6)
    assert (scaled[:5] == 0).all() and (scaled[-5:] == 1).all()
    np.testing.assert_array_equal(normalize_intensity(np.full((4, 4, 2), 7.0)), 0)


def test_binarize_labels_zonal_values_need_merge_labels(tmp_path):
    zonal = np.array([[0, 1], [2, 0]], np.uint8)
    with pytest.raises(DataError, match=r"label values \[2\].*merge_labels=True"):
        binarize_labels(zonal, tmp_path / "z.nii.gz", merge_labels=False)
    merged = binarize_labels(zonal, tmp_path / "z.nii.gz", merge_labels=True)
    np.testing.assert_array_equal(merged, [[0, 1], [1, 0]])
    with pytest.raises(DataError, match=r"0\.5"):
        binarize_labels(np.array([0.0, 0.5]), tmp_path / "f.nii.gz", merge_labels=True)
