"""Tests of the synthetic multi-domain generator and of its TFDS builders (tiny sizes)."""

import dataclasses
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


def _variant(monkeypatch, domain: str, **changes) -> str:
    """Registers `domain` with some camera parameters changed; same seed, same anatomy."""
    name = f"{domain}_variant"
    params = dataclasses.replace(generator.FUNDUS_DOMAINS[domain], **changes)
    monkeypatch.setitem(generator.FUNDUS_DOMAINS, name, params)
    return name


def _illumination_slope(image: np.ndarray, mask: np.ndarray) -> float:
    """Steepness of a linear fit to the log brightness of the background: the log gain from
    the centre to an edge. The radial term absorbs the (symmetric) vignetting."""
    size = image.shape[0]
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5 - size / 2) / (size / 2)
    design = np.stack([np.ones_like(yy), yy, xx, yy**2 + xx**2], -1)[mask == 0]
    log_brightness = np.log(image.astype(np.float64).mean(-1) + 1.0)[mask == 0]
    coef, *_ = np.linalg.lstsq(design, log_brightness, rcond=None)
    return float(np.hypot(coef[1], coef[2]))


def _mean_per_domain(statistic, n: int = 8) -> dict[str, float]:
    return {
        d: float(np.mean([statistic(im, m) for im, m in _fundus_images(d, n)]))
        for d in generator.FUNDUS_DOMAINS
    }


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


def test_fundus_disc_scale_is_the_cameras_magnification():
    # Disc area ~ pi * a * b with semi-axes ~ s and 1.075 s (the disc is slightly taller).
    area = _mean_per_domain(lambda im, m: (m > 0).mean())
    for domain, params in generator.FUNDUS_DOMAINS.items():
        expected = np.pi * 1.075 * params.disc_scale**2
        assert area[domain] == pytest.approx(expected, rel=0.15), (domain, area[domain])
    # Domain1's narrow field makes its disc the largest; its vessels are magnified with it.
    assert area["Domain1"] > 1.15 * max(v for d, v in area.items() if d != "Domain1")
    # The same vessels (same seed) at 1.5x magnification: 1.5x wider, so ~1.5x the darkening.
    thin, wide = (
        generator._vessel_map(np.random.default_rng(3), (SIZE, SIZE), (24, 24), SIZE, m)
        for m in (1.0, 1.5)
    )
    assert 1.3 < wide.sum() / thin.sum() < 1.7


def test_fundus_illumination_gradient():
    slope = _mean_per_domain(_illumination_slope)
    # Domain1 (+-0.35) is unevenly lit, the others (0.05-0.15) nearly evenly.
    assert slope["Domain1"] > 2.0 * max(v for d, v in slope.items() if d != "Domain1"), slope
    assert slope["Domain4"] < slope["Domain2"] < slope["Domain1"], slope


def test_fundus_illumination_gradient_comes_from_the_camera(monkeypatch):
    flat = _variant(monkeypatch, "Domain1", illumination=0.0)
    uneven = np.mean([_illumination_slope(*x) for x in _fundus_images("Domain1", 8)])
    even = np.mean([_illumination_slope(*x) for x in _fundus_images(flat, 8)])
    assert even < 0.5 * uneven, (even, uneven)


def test_fundus_exposure_varies_from_image_to_image():
    def spread(domain):
        return np.std([np.log(im.mean()) for im, _ in _fundus_images(domain, 12)])

    spreads = {d: spread(d) for d in generator.FUNDUS_DOMAINS}
    assert spreads["Domain1"] > 1.5 * max(v for d, v in spreads.items() if d != "Domain1")


def test_tone_curve_shoulder():
    x = np.linspace(0.0, 2.0, 201)
    y = generator._tone_curve(x, 0.6)
    np.testing.assert_array_equal(generator._tone_curve(x, 1.0), x)
    np.testing.assert_allclose(y[x <= 0.6], x[x <= 0.6])
    assert np.all(np.diff(y) > 0) and y.max() < 1.0  # monotone, never reaches the clip
    slope = np.diff(y) / np.diff(x)
    assert abs(slope[60] - 1.0) < 0.01 and slope[-1] < 0.01  # continuous at the knee


def test_fundus_over_exposed_disc_rolls_off_instead_of_clipping(monkeypatch):
    linear = _variant(monkeypatch, "Domain1", knee=1.0)

    def stats(domain):
        clipped, contrast = [], []
        for image, mask in _fundus_images(domain, 8):
            green = image[..., 1].astype(np.float64)
            cup, rim, back = (green[mask == k].mean() for k in (2, 1, 0))
            contrast.append((cup - rim) / (rim - back))
            clipped.append(np.mean(image == 255))
        return np.mean(clipped), np.mean(contrast)

    (clipped, contrast), (clipped_linear, contrast_linear) = stats("Domain1"), stats(linear)
    # The same exposure clips a few % of the values with a linear response; the shoulder
    # keeps them below 255 but squeezes the pale cup towards the rim.
    assert clipped_linear > 0.03 and clipped < 0.005, (clipped_linear, clipped)
    assert contrast < 0.92 * contrast_linear, (contrast, contrast_linear)


def test_fundus_vessel_contrast(monkeypatch):
    def dark_disc_fraction(domain):
        fractions = []
        for image, mask in _fundus_images(domain, 8):
            brightness = image.astype(np.float64).mean(-1)[mask > 0]
            fractions.append(np.mean(brightness < 0.7 * np.median(brightness)))
        return np.mean(fractions)

    # Domain1's camera shows its (wide) vessels darker than the 0.55 of an average camera.
    average = _variant(monkeypatch, "Domain1", vessel_contrast=0.55)
    assert dark_disc_fraction("Domain1") > 1.5 * dark_disc_fraction(average)


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
