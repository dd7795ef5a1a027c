"""Bad input to the real-data builders: clear errors naming the file, and nothing half-written."""

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_builders.common import DataError
from data_builders.fundus import Fundus, fundus_builder
from data_builders.prostate import Prostate, prostate_builder

tfds.disable_progress_bar()

SIZE = 8


def build(builder: tfds.core.DatasetBuilder, manual_dir: Path):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)),
        file_format="array_record",
    )
    return builder.as_data_source()


def write_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def fundus_mask(size: int = SIZE) -> np.ndarray:
    mask = np.full((size, size), 255, np.uint8)
    mask[2:-2, 2:-2] = 128
    mask[3:-3, 3:-3] = 0
    return mask


def make_fundus_domain(
    manual: Path, name: str = "Clinic", cases=("a", "b"), size: int = SIZE
) -> Path:
    """A tiny DoFE-layout domain with `cases` in both splits."""
    root = manual / name
    for split in ("train", "test"):
        for case in cases:
            image = np.zeros((size, size, 3), np.uint8)
            write_image(root / split / "ROIs/image" / f"{case}.png", image)
            write_image(root / split / "ROIs/mask" / f"{case}.png", fundus_mask(size))
    return root


def clinic_builder(data_dir: Path, **kwargs) -> Fundus:
    return fundus_builder("Clinic", data_dir, center_crop=None, **kwargs)


def slice_mask(gland_value: int = 0) -> np.ndarray:
    """A ProstateSlice-style mask: a small gland (`gland_value`) on the other value of {0, 255}."""
    mask = np.full((SIZE, SIZE), 255 - gland_value, np.uint8)
    mask[2:5, 2:5] = gland_value
    return mask


def make_slice_site(
    manual: Path, site: str = "Clinic", slices=(0, 1), gland_value: int = 0
) -> Path:
    root = manual / site
    mask = slice_mask(gland_value)
    for split in ("train", "test"):
        for k in slices:
            write_image(
                root / split / "image" / f"07_{k:02d}.png", np.full((SIZE, SIZE), 9, np.uint8)
            )
            write_image(root / split / "mask" / f"07_{k:02d}.png", mask)
    return root


def save_nifti(path: Path, data: np.ndarray, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def make_nifti_site(manual: Path, site: str = "Clinic", cases=("Case00", "Case01")) -> Path:
    root = manual / site
    rng = np.random.default_rng(0)
    for case in cases:
        labels = np.zeros((6, 6, 2), np.uint8)
        labels[1:4, 2:5] = 1
        save_nifti(root / f"{case}.nii.gz", rng.random((6, 6, 2)).astype(np.float32))
        save_nifti(root / f"{case}_segmentation.nii.gz", labels)
    return root


def clinic_nifti(data_dir: Path, **kwargs) -> Prostate:
    return prostate_builder("Clinic", data_dir, **kwargs)


def assert_nothing_written(data_dir: Path, builder_name: str, config_name: str) -> None:
    config_dir = data_dir / builder_name / config_name
    assert not (config_dir / "1.0.0").exists()
    assert not list(config_dir.glob("incomplete*"))


# ------------------------------------------------------------------ missing folders


@pytest.mark.parametrize("make_dir", [False, True], ids=["absent", "empty"])
def test_missing_or_empty_manual_dir_shows_download_instructions(tmp_path, make_dir):
    manual = tmp_path / "manual"
    if make_dir:
        manual.mkdir()
    # TFDS itself checks the manual dir and raises AssertionError with our instructions.
    with pytest.raises(AssertionError) as error:
        build(fundus_builder("Domain1", tmp_path / "data"), manual)
    assert str(manual) in str(error.value)
    assert Fundus.MANUAL_DOWNLOAD_INSTRUCTIONS.strip() in str(error.value)
    with pytest.raises(AssertionError) as error:
        build(prostate_builder("BIDMC", tmp_path / "data"), manual)
    assert Prostate.MANUAL_DOWNLOAD_INSTRUCTIONS.strip() in str(error.value)


def test_missing_domain_folder_lists_expected_paths(tmp_path):
    manual = tmp_path / "manual"
    make_fundus_domain(manual, name="Domain2")
    with pytest.raises(FileNotFoundError) as error:
        build(fundus_builder("Domain1", tmp_path / "data"), manual)
    message = str(error.value)
    for split in ("train", "test"):
        for kind in ("image", "mask"):
            assert str(manual / "Domain1" / split / "ROIs" / kind) in message
    assert "github.com/emma-sjwang/Dofe" in message
    assert_nothing_written(tmp_path / "data", "fundus", "Domain1")


def test_missing_split_folder_is_named(tmp_path):
    manual = tmp_path / "manual"
    root = make_fundus_domain(manual)
    for path in sorted((root / "test/ROIs/mask").iterdir()):
        path.unlink()
    (root / "test/ROIs/mask").rmdir()
    with pytest.raises(FileNotFoundError, match="Missing 1 of the expected folders") as error:
        build(clinic_builder(tmp_path / "data"), manual)
    assert f"  {root / 'test/ROIs/mask'}  <- missing\n" in str(error.value)
    assert f"  {root / 'test/ROIs/image'}\n" in str(error.value)


def test_missing_prostate_site_folders(tmp_path):
    manual = tmp_path / "manual"
    make_nifti_site(manual, site="HK")
    with pytest.raises(FileNotFoundError) as error:
        build(prostate_builder("BIDMC", tmp_path / "data"), manual)
    assert str(manual / "BIDMC") in str(error.value)
    assert "liuquande.github.io/SAML" in str(error.value)
    with pytest.raises(FileNotFoundError) as error:
        build(prostate_builder("HK", tmp_path / "data", layout="slices"), manual)
    assert str(manual / "HK" / "train" / "image") in str(error.value)


# ------------------------------------------------------------------ pairing


def test_unpaired_files_are_listed_or_skipped(tmp_path, caplog):
    manual = tmp_path / "manual"
    root = make_fundus_domain(manual, cases=("a", "b", "c"))
    (root / "train/ROIs/mask/b.png").unlink()
    (root / "test/ROIs/image/c.png").unlink()
    with pytest.raises(DataError) as error:
        build(clinic_builder(tmp_path / "data"), manual)
    message = str(error.value)
    assert f"image without mask: {root / 'train/ROIs/image/b.png'}" in message
    assert "skip_unpaired=True" in message
    assert_nothing_written(tmp_path / "data", "fundus", "Clinic")

    with caplog.at_level(logging.WARNING):
        sources = build(clinic_builder(tmp_path / "data", skip_unpaired=True), manual)
    assert {k: len(v) for k, v in sources.items()} == {"train": 2, "test": 2}
    assert f"mask without image: {root / 'test/ROIs/mask/c.png'}" in caplog.text


def test_unpaired_nifti_and_slices(tmp_path):
    manual = tmp_path / "manual"
    root = make_nifti_site(manual, cases=("Case00", "Case01", "Case02"))
    (root / "Case01_segmentation.nii.gz").unlink()
    (root / "Case02.nii.gz").unlink()
    with pytest.raises(DataError) as error:
        build(clinic_nifti(tmp_path / "data"), manual)
    assert f"image without mask: {root / 'Case01.nii.gz'}" in str(error.value)
    assert f"mask without image: {root / 'Case02_segmentation.nii.gz'}" in str(error.value)
    sources = build(clinic_nifti(tmp_path / "data", skip_unpaired=True), manual)
    assert set(sources) == {"train"}  # A single case left: no validation split.

    slices = make_slice_site(manual, site="Slices")
    (slices / "test/mask/07_01.png").unlink()
    with pytest.raises(DataError, match=r"07_01\.png"):
        build(prostate_builder("Slices", tmp_path / "data", layout="slices"), manual)


def test_two_files_with_one_stem_are_ambiguous(tmp_path):
    manual = tmp_path / "manual"
    root = make_fundus_domain(manual)
    write_image(root / "train/ROIs/image/a.bmp", np.zeros((SIZE, SIZE, 3), np.uint8))
    with pytest.raises(DataError, match="same name stem") as error:
        build(clinic_builder(tmp_path / "data"), manual)
    assert "a.bmp" in str(error.value) and "a.png" in str(error.value)


@pytest.mark.parametrize("layout", ["fundus", "nifti", "slices"])
def test_empty_domain(tmp_path, layout):
    manual = tmp_path / "manual"
    if layout == "fundus":
        for sub in ("train/ROIs/image", "train/ROIs/mask", "test/ROIs/image", "test/ROIs/mask"):
            (manual / "Clinic" / sub).mkdir(parents=True)
        builder = clinic_builder(tmp_path / "data")
    elif layout == "nifti":
        (manual / "Clinic").mkdir(parents=True)
        (manual / "Clinic" / "notes.txt").write_text("no volumes here")
        builder = clinic_nifti(tmp_path / "data")
    else:
        for sub in ("train/image", "train/mask", "test/image", "test/mask"):
            (manual / "Clinic" / sub).mkdir(parents=True)
        builder = prostate_builder("Clinic", tmp_path / "data", layout="slices")
    with pytest.raises(DataError, match="empty") as error:
        build(builder, manual)
    assert str(manual / "Clinic") in str(error.value)


# ------------------------------------------------------------------ file contents


def test_fundus_mask_values_outside_convention(tmp_path):
    manual = tmp_path / "manual"
    root = make_fundus_domain(manual)
    bad = fundus_mask()
    bad[0, 0], bad[0, 1] = 100, 200
    path = write_image(root / "test/ROIs/mask/b.png", bad)
    with pytest.raises(DataError) as error:
        build(clinic_builder(tmp_path / "data"), manual)
    assert str(path) in str(error.value) and "[100, 200]" in str(error.value)


def test_fundus_rgb_mask_with_unequal_channels(tmp_path):
    manual = tmp_path / "manual"
    root = make_fundus_domain(manual)
    rgb = np.repeat(fundus_mask()[..., None], 3, axis=-1)
    rgb[..., 0] = 255
    path = write_image(root / "train/ROIs/mask/a.png", rgb)
    with pytest.raises(DataError, match="colour channels differ") as error:
        build(clinic_builder(tmp_path / "data"), manual)
    assert str(path) in str(error.value)


def test_slice_mask_values_outside_convention(tmp_path):
    manual = tmp_path / "manual"
    root = make_slice_site(manual)
    path = write_image(root / "train/mask/07_01.png", np.eye(SIZE, dtype=np.uint8))  # 0/1 mask.
    with pytest.raises(DataError, match=r"mask values \[1\]") as error:
        build(prostate_builder("Clinic", tmp_path / "data", layout="slices"), manual)
    assert str(path) in str(error.value) and "255 background, 0 prostate" in str(error.value)


def test_inverted_slice_masks_are_refused(tmp_path):
    """Masks drawn white-on-black read with the release's convention would make the gland most
    of the image; the build refuses them and names the option that reads them."""
    manual = tmp_path / "manual"
    make_slice_site(manual, gland_value=255)
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match="slice_foreground_value=255") as error:
        build(prostate_builder("Clinic", data_dir, layout="slices"), manual)
    assert "Site Clinic" in str(error.value)
    assert_nothing_written(data_dir, "prostate", "Clinic_slices")


@pytest.mark.parametrize("gland_value", [0, 255])
def test_slice_foreground_value_reads_either_drawing(tmp_path, gland_value):
    manual = tmp_path / "manual"
    make_slice_site(manual, gland_value=gland_value)
    source = build(
        prostate_builder(
            "Clinic", tmp_path / "data", layout="slices", slice_foreground_value=gland_value
        ),
        manual,
    )
    expected = (slice_mask(gland_value) == gland_value).astype(np.uint8)
    for split in ("train", "test"):
        for i in range(len(source[split])):
            np.testing.assert_array_equal(source[split][i]["mask"][..., 0], expected)


def test_slice_foreground_value_must_be_0_or_255(tmp_path):
    with pytest.raises(ValueError, match="must be 0 or 255"):
        prostate_builder("Clinic", tmp_path, layout="slices", slice_foreground_value=1)


def test_slice_name_must_be_case_and_slice(tmp_path):
    manual = tmp_path / "manual"
    root = make_slice_site(manual)
    for kind in ("image", "mask"):
        (root / "test" / kind / "07_01.png").rename(root / "test" / kind / "scan.png")
    with pytest.raises(DataError, match="<case>_<slice>") as error:
        build(prostate_builder("Clinic", tmp_path / "data", layout="slices"), manual)
    assert "scan.png" in str(error.value)


@pytest.mark.parametrize("layout", ["fundus", "slices"])
def test_image_and_mask_size_mismatch(tmp_path, layout):
    manual = tmp_path / "manual"
    if layout == "fundus":
        root = make_fundus_domain(manual)
        path = write_image(root / "train/ROIs/mask/b.png", fundus_mask(SIZE + 2))
        builder = clinic_builder(tmp_path / "data")
    else:
        root = make_slice_site(manual)
        path = write_image(root / "test/mask/07_00.png", np.zeros((SIZE, SIZE + 1), np.uint8))
        builder = prostate_builder("Clinic", tmp_path / "data", layout="slices")
    with pytest.raises(DataError, match="sizes differ") as error:
        build(builder, manual)
    assert str(path) in str(error.value)


def test_image_smaller_than_center_crop(tmp_path):
    manual = tmp_path / "manual"
    make_fundus_domain(manual, name="Domain4")
    with pytest.raises(DataError, match="smaller than the centre crop 512x512"):
        build(fundus_builder("Domain4", tmp_path / "data"), manual)


@pytest.mark.parametrize("damage", ["truncated", "not_an_image"])
def test_unreadable_image(tmp_path, damage):
    manual = tmp_path / "manual"
    root = make_fundus_domain(manual, cases=("a",))
    path = write_image(
        root / "test/ROIs/image/a.png",
        np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8),
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a png")
    with pytest.raises(DataError, match="unreadable or truncated") as error:
        build(clinic_builder(tmp_path / "data"), manual)
    assert str(path) in str(error.value)


# ------------------------------------------------------------------ NIfTI volumes


def test_nifti_shape_mismatch(tmp_path):
    manual = tmp_path / "manual"
    root = make_nifti_site(manual)
    path = save_nifti(root / "Case01_segmentation.nii.gz", np.zeros((6, 5, 2), np.uint8))
    with pytest.raises(DataError, match="shapes differ") as error:
        build(clinic_nifti(tmp_path / "data"), manual)
    assert str(path) in str(error.value) and "(6, 5, 2)" in str(error.value)


def test_nifti_affine_mismatch(tmp_path):
    manual = tmp_path / "manual"
    root = make_nifti_site(manual)
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    path = save_nifti(root / "Case00_segmentation.nii.gz", np.zeros((6, 6, 2), np.uint8), shifted)
    with pytest.raises(DataError, match="affines differ") as error:
        build(clinic_nifti(tmp_path / "data"), manual)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("damage", ["truncated", "not_nifti"])
def test_unreadable_nifti(tmp_path, damage):
    manual = tmp_path / "manual"
    root = make_nifti_site(manual)
    path = root / "Case01.nii.gz"
    if damage == "truncated":
        # Large enough that the header survives and the voxel data is cut.
        noise = np.random.default_rng(1).random((32, 32, 8)).astype(np.float32)
        save_nifti(path, noise)
        save_nifti(root / "Case01_segmentation.nii.gz", np.zeros(noise.shape, np.uint8))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        match = "unreadable or truncated NIfTI data"
    else:
        path.write_bytes(b"not a volume")
        match = "unreadable NIfTI file"
    with pytest.raises(DataError, match=match) as error:
        build(clinic_nifti(tmp_path / "data"), manual)
    assert str(path) in str(error.value)


def test_nifti_zonal_labels_need_merge_labels(tmp_path):
    manual = tmp_path / "manual"
    root = make_nifti_site(manual)
    zonal = np.zeros((6, 6, 2), np.uint8)
    zonal[1:3, 1:3], zonal[3:5, 3:5] = 1, 2
    path = save_nifti(root / "Case00_segmentation.nii.gz", zonal)
    with pytest.raises(DataError, match=r"label values \[2\]") as error:
        build(clinic_nifti(tmp_path / "data"), manual)
    assert str(path) in str(error.value) and "merge_labels=True" in str(error.value)
    train = build(clinic_nifti(tmp_path / "data", merge_labels=True), manual)["train"]
    assert train[0]["mask"].sum() > 0 and set(np.unique(train[0]["mask"])) == {0, 1}


# ------------------------------------------------------------------ failed builds


def test_failed_build_leaves_no_dataset(tmp_path):
    """TFDS writes into `<config>/incomplete.*` and renames to `<config>/1.0.0` only on success."""
    manual, data_dir = tmp_path / "manual", tmp_path / "data"
    root = make_fundus_domain(manual, name="Domain3", size=512)
    bad = fundus_mask(512)
    bad[0, 0] = 7
    write_image(root / "test/ROIs/mask/b.png", bad)  # The train split is written first.
    with pytest.raises(DataError, match=r"b\.png"):
        build(fundus_builder("Domain3", data_dir), manual)
    assert_nothing_written(data_dir, "fundus", "Domain3")
    # Reading it back fails instead of returning a partial dataset (TFDS 4.9.10 finds no
    # dataset_info.json, falls back to its default tfrecord format and refuses random access).
    with pytest.raises((ValueError, NotImplementedError)):
        tfds.data_source("fundus/Domain3", data_dir=data_dir, download=False)

    # Once the file is fixed the same command builds the complete dataset.
    write_image(root / "test/ROIs/mask/b.png", fundus_mask(512))
    sources = build(fundus_builder("Domain3", data_dir), manual)
    assert {k: len(v) for k, v in sources.items()} == {"train": 2, "test": 2}


def test_failed_custom_config_build_is_not_found(tmp_path):
    manual, data_dir = tmp_path / "manual", tmp_path / "data"
    root = make_slice_site(manual, slices=(0, 1, 2))
    write_image(root / "test/mask/07_02.png", np.full((SIZE, SIZE), 3, np.uint8))
    with pytest.raises(DataError, match=r"07_02\.png"):
        build(prostate_builder("Clinic", data_dir, layout="slices"), manual)
    assert_nothing_written(data_dir, "prostate", "Clinic_slices")
    with pytest.raises(ValueError, match="Clinic_slices not found"):
        tfds.data_source("prostate/Clinic_slices", data_dir=data_dir, download=False)


def test_failed_nifti_build_in_validation_leaves_no_dataset(tmp_path):
    manual, data_dir = tmp_path / "manual", tmp_path / "data"
    root = make_nifti_site(manual, cases=("Case00", "Case01"))
    (root / "Case01_segmentation.nii.gz").write_bytes(b"")  # Case01 is the validation case.
    with pytest.raises(DataError, match=r"Case01_segmentation\.nii\.gz"):
        build(clinic_nifti(data_dir), manual)
    assert_nothing_written(data_dir, "prostate", "Clinic")
