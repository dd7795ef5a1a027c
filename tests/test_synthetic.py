"""Tests of the synthetic multi-domain generator and of its TFDS builders (tiny sizes)."""

import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_builders.common import segmentation_features
from data_builders.synthetic import generator
from data_builders.synthetic.synthetic import (
    SynthFundus,
    SynthFundusConfig,
    SynthProstate,
    SynthProstateConfig,
)

SIZE = 48


def _boundary(region: np.ndarray) -> np.ndarray:
    """Pixels of a boolean region with a 4-neighbour of the other value."""
    padded = np.pad(region, 1, mode="edge")
    h, w = region.shape
    shifted = [padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in ((0, 1), (1, 0))]
    shifted += [padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in ((0, -1), (-1, 0))]
    return np.any([s != region for s in shifted], axis=0)


def _gradient_magnitude(image: np.ndarray) -> np.ndarray:
    gy, gx = np.gradient(image.astype(np.float64).mean(axis=-1))
    return np.hypot(gy, gx)


def _fundus_images(domain: str, n: int = 6, seed: int = 1):
    return [generator.generate_fundus((seed, i), domain, SIZE) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------------


def test_fundus_is_deterministic():
    image, mask = generator.generate_fundus((0, 1, 0, 3), "Domain2", SIZE)
    image_again, mask_again = generator.generate_fundus((0, 1, 0, 3), "Domain2", SIZE)
    other, _ = generator.generate_fundus((0, 1, 0, 4), "Domain2", SIZE)
    assert image.tobytes() == image_again.tobytes() and mask.tobytes() == mask_again.tobytes()
    assert image.tobytes() != other.tobytes()
    from_rng, _ = generator.generate_fundus(np.random.default_rng((0, 1, 0, 3)), "Domain2", SIZE)
    assert from_rng.tobytes() == image.tobytes()


@pytest.mark.parametrize("domain", list(generator.FUNDUS_DOMAINS))
def test_fundus_labels_and_cup_inside_disc(domain):
    for image, mask in _fundus_images(domain):
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 1, 2}
        # Every cup pixel's 3x3 neighbourhood is disc (rim or cup), never background.
        disc = np.pad(mask > 0, 1)
        neighbourhood_is_disc = np.all(
            [disc[i : i + SIZE, j : j + SIZE] for i, j in itertools.product(range(3), repeat=2)],
            axis=0,
        )
        assert np.all(neighbourhood_is_disc[mask == 2])


def test_fundus_domains_differ_in_colour():
    means = {
        d: np.mean([im.reshape(-1, 3).mean(0) for im, _ in _fundus_images(d)], axis=0)
        for d in generator.FUNDUS_DOMAINS
    }
    for a, b in itertools.combinations(means, 2):
        assert np.linalg.norm(means[a] - means[b]) > 15.0, (a, b, means[a], means[b])


def test_fundus_blurry_domain_has_soft_edges():
    def edge_gradients(domain):
        cup, disc, overall = [], [], []
        for image, mask in _fundus_images(domain):
            magnitude = _gradient_magnitude(image)
            cup.append(magnitude[_boundary(mask == 2)].mean())
            disc.append(magnitude[_boundary(mask > 0)].mean())
            overall.append(np.mean(magnitude**2))
        return np.mean(cup), np.mean(disc), np.mean(overall)

    sharp_cup, sharp_disc, sharp_energy = edge_gradients("Domain1")
    _, blurry_disc, blurry_energy = edge_gradients("Domain4")
    # The cup/rim boundary is a gradual ramp even with a sharp camera.
    assert sharp_cup < 0.7 * sharp_disc
    # Blur and a soft disc edge make the blurry domain's boundaries ambiguous.
    assert blurry_disc < 0.5 * sharp_disc
    assert blurry_energy < 0.7 * sharp_energy


def test_prostate_volume_shapes_labels_and_empty_ends():
    for site in generator.PROSTATE_SITES:
        volume, mask, spacing = generator.generate_prostate_volume((2, 0), site, SIZE, 7)
        assert volume.shape == mask.shape == (7, SIZE, SIZE)
        assert volume.dtype == mask.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 1}
        per_slice = mask.reshape(7, -1).sum(-1)
        assert per_slice[0] == 0 and per_slice[-1] == 0
        assert per_slice[3] > 0
        params = generator.PROSTATE_SITES[site]
        np.testing.assert_allclose(
            spacing, (params.fov_mm / SIZE, params.fov_mm / SIZE, params.slice_thickness_mm)
        )


def test_prostate_is_deterministic_and_sites_differ():
    def volume(seed, site="SiteA"):
        return generator.generate_prostate_volume(seed, site, SIZE, 5)[0]

    assert volume((0, 0)).tobytes() == volume((0, 0)).tobytes()
    assert volume((0, 0)).tobytes() != volume((0, 1)).tobytes()
    means = {
        s: np.mean([volume((3, i), s).mean() for i in range(2)]) for s in generator.PROSTATE_SITES
    }
    for a, b in itertools.combinations(means, 2):
        assert abs(means[a] - means[b]) > 5.0, (a, b, means[a], means[b])
    spacings = {
        generator.generate_prostate_volume(0, s, SIZE, 3)[2] for s in generator.PROSTATE_SITES
    }
    assert len(spacings) == len(generator.PROSTATE_SITES)


# ----------------------------------------------------------------------------------------------
# TFDS builders
# ----------------------------------------------------------------------------------------------


def _build(builder_cls, config, data_dir):
    builder = builder_cls(config=config, data_dir=data_dir)
    builder.download_and_prepare(file_format="array_record")
    return builder


def test_fundus_builder_reads_back(tmp_path):
    # TFDS refuses a custom config named like a registered one: tiny sets get their own name.
    config = SynthFundusConfig(
        name="Domain3_tiny", domain="Domain3", num_train=3, num_test=2, size=32
    )
    builder = _build(SynthFundus, config, tmp_path)
    assert repr(builder.info.features) == repr(segmentation_features(image_channels=3))
    train = tfds.data_source("synth_fundus/Domain3_tiny", split="train", data_dir=tmp_path)
    test = builder.as_data_source()["test"]
    assert (len(train), len(test)) == (3, 2)
    case_ids = set()
    for example in [train[i] for i in range(3)]:
        assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
        assert example["mask"].shape == (32, 32, 1) and example["mask"].dtype == np.uint8
        assert set(np.unique(example["mask"])) <= {0, 1, 2}
        assert int(example["slice_index"]) == 0 and int(example["num_slices"]) == 1
        assert example["spacing"].dtype == np.float32
        np.testing.assert_array_equal(example["spacing"], np.ones(3))
        assert example["spacing_unit"] == b"pixel" and example["domain"] == b"Domain3"
        case_ids.add(example["case_id"])
    # The stored image is the generator's, drawn from (seed, domain, split, index).
    image, mask = generator.generate_fundus([0, 2, 0, 1], "Domain3", 32)
    stored = [train[i] for i in range(3) if train[i]["case_id"] == b"Domain3_train_0001"][0]
    np.testing.assert_array_equal(stored["image"], image)
    np.testing.assert_array_equal(stored["mask"][..., 0], mask)
    assert case_ids.isdisjoint(test[i]["case_id"] for i in range(2))


def test_prostate_builder_reads_back_volumes(tmp_path):
    config = SynthProstateConfig(
        name="SiteB_tiny", domain="SiteB", num_train=2, num_test=1, num_slices=5, size=32
    )
    builder = _build(SynthProstate, config, tmp_path)
    assert repr(builder.info.features) == repr(segmentation_features(image_channels=1))
    train = tfds.data_source("synth_prostate/SiteB_tiny", split="train", data_dir=tmp_path)
    assert (len(train), len(builder.as_data_source()["test"])) == (10, 5)
    volumes = {}
    for example in [train[i] for i in range(len(train))]:
        assert example["image"].shape == (32, 32, 1) and example["image"].dtype == np.uint8
        assert example["mask"].shape == (32, 32, 1) and set(np.unique(example["mask"])) <= {0, 1}
        assert int(example["num_slices"]) == 5
        assert example["spacing_unit"] == b"mm" and example["domain"] == b"SiteB"
        np.testing.assert_allclose(example["spacing"], (2.0, 2.0, 4.0))
        volumes.setdefault(example["case_id"], {})[int(example["slice_index"])] = example["mask"]
    assert len(volumes) == 2
    for slices in volumes.values():
        assert sorted(slices) == list(range(5))
        assert slices[0].sum() == 0 and slices[4].sum() == 0 and slices[2].sum() > 0


def test_builder_is_deterministic_and_checks_domain(tmp_path):
    config = SynthFundusConfig(name="tiny", domain="Domain1", num_train=2, num_test=1, size=24)
    first = _build(SynthFundus, config, tmp_path / "a").as_data_source()["train"]
    second = _build(SynthFundus, config, tmp_path / "b").as_data_source()["train"]
    a, b = ({s[i]["case_id"]: s[i]["image"] for i in range(2)} for s in (first, second))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="Unknown synthetic domain"):
        _build(SynthFundus, SynthFundusConfig(name="Domain9", num_train=1, num_test=1), tmp_path)
    assert not list(tmp_path.glob("synth_fundus/Domain9/**/*.array_record*"))
