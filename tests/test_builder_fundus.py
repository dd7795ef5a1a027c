"""Tests of the `fundus` builder: the four real DoFE domains and small generated domains."""

from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_builders.fundus import Fundus, FundusConfig, fundus_builder
from data_builders.fundus.fundus import center_crop_window
from tests.conftest import SHARED_DATA

tfds.disable_progress_bar()


FUNDUS_DIR = SHARED_DATA / "fundus"

# (train, test) counts of the shared copy, as in its README.
EXPECTED_COUNTS = {
    "Domain1": (50, 51),
    "Domain2": (3, 3),
    "Domain3": (239, 83),
    "Domain4": (3, 3),
}
SKIP_IMAGE = {"image": tfds.decode.SkipDecoding()}


def build(builder: tfds.core.DatasetBuilder, manual_dir: Path):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)),
        file_format="array_record",
    )
    return builder.as_data_source()


def write_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def disc_mask(size: int) -> np.ndarray:
    """255 background, a 128 rim disc of radius size/3 and a 0 cup of radius size/6."""
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    radius = np.hypot(yy, xx)
    mask = np.full((size, size), 255, np.uint8)
    mask[radius < size / 3] = 128
    mask[radius < size / 6] = 0
    return mask


# ------------------------------------------------------------------ real data


@pytest.fixture(scope="session")
def fundus_data_dir(tmp_path_factory) -> Path:
    """Builds the four real domains once per session (Domain3's 322 PNGs take ~11 s)."""
    data_dir = tmp_path_factory.mktemp("tfds_fundus")
    for domain in EXPECTED_COUNTS:
        build(fundus_builder(domain, data_dir), FUNDUS_DIR)
    return data_dir


@pytest.mark.real_data
@pytest.mark.parametrize("domain", sorted(EXPECTED_COUNTS))
def test_real_domain_counts_and_features(fundus_data_dir, domain):
    sources = tfds.data_source(f"fundus/{domain}", data_dir=fundus_data_dir, decoders=SKIP_IMAGE)
    assert set(sources) == {"train", "test"}
    for split, expected in zip(("train", "test"), EXPECTED_COUNTS[domain], strict=True):
        source = sources[split]
        assert len(source) == expected
        examples = [source[i] for i in range(len(source))]
        names = sorted(p.stem for p in (FUNDUS_DIR / domain / split / "ROIs" / "image").iterdir())
        assert [e["case_id"].decode() for e in examples] == names  # Stored in name order.
        for e in examples:
            assert e["mask"].shape == (512, 512, 1) and e["mask"].dtype == np.uint8
            assert set(np.unique(e["mask"])) <= {0, 1, 2}
            assert e["domain"] == domain.encode()
            assert (e["slice_index"], e["num_slices"]) == (0, 1)
            np.testing.assert_array_equal(e["spacing"], np.ones(3, np.float32))
            assert e["spacing_unit"] == b"pixel"


@pytest.mark.real_data
@pytest.mark.parametrize("domain", sorted(EXPECTED_COUNTS))
def test_real_domain_pixels_match_files(fundus_data_dir, domain):
    """Image pixels are stored unchanged; OD = stored value < 255 and OC = stored value 0."""
    source = tfds.data_source(f"fundus/{domain}", split="test", data_dir=fundus_data_dir)
    for index in (0, len(source) - 1):
        example = source[index]
        name = example["case_id"].decode()
        image = np.asarray(Image.open(FUNDUS_DIR / domain / "test/ROIs/image" / f"{name}.png"))
        stored = np.asarray(Image.open(FUNDUS_DIR / domain / "test/ROIs/mask" / f"{name}.png"))
        stored = stored[..., 0] if stored.ndim == 3 else stored
        np.testing.assert_array_equal(example["image"], image)
        mask = example["mask"][..., 0]
        np.testing.assert_array_equal(mask >= 1, stored < 255)
        np.testing.assert_array_equal(mask == 2, stored == 0)
        assert (mask == 2).any() and (mask == 1).any()


@pytest.mark.real_data
def test_real_800_roi_is_cropped_to_the_shared_512_copy(tmp_path):
    """A DoFE 800x800 ROI crops to [144:656, 144:656], identical to the 512x512 copy."""
    name = "G-1-L"
    image = np.asarray(Image.open(FUNDUS_DIR / "Domain2/train/ROIs/image" / f"{name}.png"))
    mask = np.asarray(Image.open(FUNDUS_DIR / "Domain2/train/ROIs/mask" / f"{name}.png"))
    rng = np.random.default_rng(0)
    big_image = rng.integers(0, 256, (800, 800, 3), dtype=np.uint8)
    big_mask = np.full((800, 800, 3), 255, np.uint8)
    big_image[144:656, 144:656] = image
    big_mask[144:656, 144:656] = mask
    manual = tmp_path / "manual"
    for split in ("train", "test"):
        write_image(manual / "Domain2" / split / "ROIs/image" / f"{name}.png", big_image)
        write_image(manual / "Domain2" / split / "ROIs/mask" / f"{name}.png", big_mask)
    cropped = build(fundus_builder("Domain2", tmp_path / "data"), manual)["train"][0]
    np.testing.assert_array_equal(cropped["image"], image)
    expected = np.array([2, 1, 0], np.uint8)[np.searchsorted([0, 128, 255], mask[..., 0])]
    np.testing.assert_array_equal(cropped["mask"][..., 0], expected)


# ------------------------------------------------------------------ generated data


def test_center_crop_window_of_dofe_roi():
    assert center_crop_window((800, 800), 512) == (slice(144, 656), slice(144, 656))
    assert center_crop_window((512, 512), 512) == (slice(0, 512), slice(0, 512))
    assert center_crop_window((601, 700), 512) == (slice(44, 556), slice(94, 606))


def test_registered_configs_describe_their_source():
    descriptions = {c.name: c.description for c in Fundus.BUILDER_CONFIGS}
    assert sorted(descriptions) == ["Domain1", "Domain2", "Domain3", "Domain4"]
    assert "Drishti-GS" in descriptions["Domain1"]
    assert "RIM-ONE-r3" in descriptions["Domain2"]
    assert "REFUGE training" in descriptions["Domain3"]
    assert "REFUGE validation" in descriptions["Domain4"]
    assert all(c.center_crop == 512 for c in Fundus.BUILDER_CONFIGS)


def test_new_domain_mixed_extensions_grey_and_rgb_masks(tmp_path):
    """A user's DomainN folder: images and masks paired by stem across .jpg/.png/.bmp."""
    rng = np.random.default_rng(1)
    manual = tmp_path / "manual"
    root = manual / "Domain5"
    mask = disc_mask(24)
    png_image = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    write_image(root / "train/ROIs/image/b.png", png_image)
    write_image(root / "train/ROIs/mask/b.bmp", mask)  # Grey mask.
    write_image(root / "train/ROIs/image/a.jpg", png_image)
    write_image(root / "train/ROIs/mask/a.png", np.repeat(mask[..., None], 3, -1))  # RGB mask.
    write_image(root / "test/ROIs/image/c.png", png_image)
    write_image(root / "test/ROIs/mask/c.png", mask)

    config = FundusConfig(name="Domain5", center_crop=None)  # Keep the 24x24 images whole.
    builder = Fundus(data_dir=tmp_path / "data", config=config)
    sources = build(builder, manual)
    assert {k: len(v) for k, v in sources.items()} == {"train": 2, "test": 1}
    first, second = sources["train"][0], sources["train"][1]
    assert (first["case_id"], second["case_id"]) == (b"a", b"b")
    jpeg = np.asarray(Image.open(root / "train/ROIs/image/a.jpg").convert("RGB"))
    np.testing.assert_array_equal(first["image"], jpeg)
    np.testing.assert_array_equal(second["image"], png_image)
    expected = np.select([mask == 255, mask == 128, mask == 0], [0, 1, 2])
    for example in (first, second):
        np.testing.assert_array_equal(example["mask"][..., 0], expected)
        assert example["domain"] == b"Domain5"
    # The folder is readable by name, like a registered domain.
    again = tfds.data_source("fundus/Domain5", data_dir=tmp_path / "data", split="test")
    assert len(again) == 1


def test_fundus_builder_crop_and_options(tmp_path):
    rng = np.random.default_rng(2)
    manual = tmp_path / "manual"
    big = rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)
    big_mask = np.full((40, 44), 255, np.uint8)
    big_mask[10:30, 12:32] = disc_mask(20)
    for split in ("train", "test"):
        write_image(manual / "Hospital" / split / "ROIs/image/x.png", big)
        write_image(manual / "Hospital" / split / "ROIs/mask/x.png", big_mask)
    builder = fundus_builder("Hospital", tmp_path / "data", center_crop=20)
    assert builder.builder_config.name == "Hospital"
    example = build(builder, manual)["test"][0]
    np.testing.assert_array_equal(example["image"], big[10:30, 12:32])
    np.testing.assert_array_equal(example["mask"][..., 0] == 2, disc_mask(20) == 0)

    whole = fundus_builder("Hospital", tmp_path / "data", center_crop=None, name="Hospital_full")
    assert build(whole, manual)["train"][0]["image"].shape == (40, 44, 3)

    with pytest.raises(ValueError, match="registered config"):
        fundus_builder("Domain1", tmp_path / "data", center_crop=None)
    assert (
        fundus_builder("Domain1", tmp_path / "data").builder_config
        is Fundus.builder_configs["Domain1"]
    )


def test_target_only_domain_with_test_split(tmp_path):
    manual = tmp_path / "manual"
    write_image(manual / "Target/test/ROIs/image/t.png", np.zeros((8, 8, 3), np.uint8))
    write_image(manual / "Target/test/ROIs/mask/t.png", disc_mask(8))
    builder = fundus_builder("Target", tmp_path / "data", center_crop=None, splits=("test",))
    assert set(build(builder, manual)) == {"test"}


@pytest.mark.real_data
def test_store_size_keeps_pipeline_pixels_and_distance_unit(tmp_path):
    from puseg_jax.data.transforms import preprocess, resize, to_input_size
    from tests.conftest import test_config

    config = FundusConfig(name="Domain2_small", folder="Domain2", store_size=64)
    src = build(Fundus(config=config, data_dir=str(tmp_path)), FUNDUS_DIR)["train"]
    full = build(fundus_builder("Domain2", str(tmp_path)), FUNDUS_DIR)["train"]
    assert len(src) == len(full) == 3
    experiment = test_config(**{"data.image_size": 64})
    for i in range(3):
        small, ref = src[i], full[i]
        assert small["image"].shape == (64, 64, 3)
        # The same resampling the input pipeline applies to the full-size image.
        np.testing.assert_array_equal(small["image"], resize(ref["image"], 64, False))
        # The mask stays on the released 512x512 grid, which evaluation scores on, and the
        # spacing is that of one released pixel.
        np.testing.assert_array_equal(small["mask"], ref["mask"])
        np.testing.assert_array_equal(small["spacing"], np.ones(3, np.float32))
        assert small["domain"] == b"Domain2"
        # The network's input, mask and spacing (in released pixels) are those of the full
        # build, with and without augmentation.
        a, b = to_input_size(dict(small), 64), to_input_size(dict(ref), 64)
        for key in ("image", "mask"):
            np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_allclose(a["spacing"], [8.0, 8.0, 1.0])
        for rng in (None, 7):
            pa = preprocess(dict(small), experiment, rng and np.random.default_rng(rng))
            pb = preprocess(dict(ref), experiment, rng and np.random.default_rng(rng))
            for key in pa:
                np.testing.assert_array_equal(pa[key], pb[key])
