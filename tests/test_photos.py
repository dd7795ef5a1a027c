"""Whole fundus photographs (external/photo_checks.py, photos.py, localise.py): locating the disc,
crop and paste-back, the training framing, photograph-or-region, bad photographs.

Synthetic photographs: a circular field of view on black, retina in orange-red, and discs of a
colour only discs have (high green). The fake model "sees" a disc exactly where the pixels are
disc-coloured (probability from the green channel), so the expected centre is the centroid of the
disc's pixels, known exactly. No JAX here.
"""

import math

import numpy as np
import pytest
from PIL import Image

from puseg_jax.external import localise, photo_checks, photos

S = 64  # network input of the fake model (small: these tests crop and resize many windows)
RETINA = (170, 80, 40)
DISC = (240, 220, 150)
FAINT = (230, 155, 120)  # green 155: probability 0.58, uncertainty 0.97: a doubtful spot
REFLEX = (255, 118, 255)  # brighter than a disc, but green 118: no disc for the fake model


def fake_predict(regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Disc probability from the green channel (retina 80 -> 0, disc 220 -> 1), uncertainty
    4 p (1 - p): certain inside and outside the disc, unsure on its edge."""
    assert regions.dtype == np.uint8 and regions.shape[1:] == (S, S, 3)
    p = np.clip((regions[..., 1].astype(np.float32) - 120.0) / 60.0, 0.0, 1.0)
    return p, 4.0 * p * (1.0 - p)


def disc_pixels(shape, centre, diameter):
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= (diameter / 2) ** 2


def synth_photo(shape=(600, 800), discs=(((300, 250), 90),), faint=(), seed=0, fov=True):
    """uint8 photograph and its release mask (disc rim 128, cup 0 in the disc's middle)."""
    rs = np.random.RandomState(seed)
    h, w = shape
    img = np.zeros((h, w, 3), np.float32)
    if fov:
        inside = disc_pixels(shape, ((h - 1) / 2, (w - 1) / 2), 0.98 * w)
    else:
        inside = np.ones(shape, bool)
    img[inside] = RETINA
    img += rs.normal(0, 6, img.shape) * inside[..., None]
    mask = np.full(shape, 255, np.uint8)
    for (r, c), d in faint:
        img[disc_pixels(shape, (r, c), d) & inside] = FAINT
    for (r, c), d in discs:
        od = disc_pixels(shape, (r, c), d) & inside
        img[od] = DISC
        mask[od] = 128
        mask[disc_pixels(shape, (r, c), d / 2) & inside] = 0
    return np.clip(img, 0, 255).astype(np.uint8), mask


def centroid(od):
    rows, cols = np.nonzero(od)
    return rows.mean(), cols.mean()


FRAMING = 0.6


# ---------------------------------------------------------------------------------------------
# The training framing.


def test_training_framing_median_of_masks():
    masks = []
    for d in (50, 60, 70):  # disc diameters in regions of 100: framing 0.5, 0.6, 0.7
        m = np.full((100, 100), 255, np.uint8)
        m[disc_pixels((100, 100), (50, 50), d)] = 128
        masks.append(m)
    masks.append(np.full((100, 100), 255, np.uint8))  # no disc: not counted
    fr = photos.training_framing(masks)
    assert fr.n == 3 and fr.n_empty == 1
    assert fr.value == pytest.approx(0.6, abs=0.01)
    assert fr.low < fr.value < fr.high
    assert "median of 3 training masks" in fr.describe()
    # TFDS class indices: disc = mask > 0.
    classes = [np.where(m == 255, 0, 1).astype(np.uint8) for m in masks]
    assert photos.training_framing(classes, "classes").value == pytest.approx(fr.value)
    with pytest.raises(ValueError, match="no training mask holds a disc"):
        photos.training_framing([np.full((10, 10), 255, np.uint8)])


# ---------------------------------------------------------------------------------------------
# Localisation on synthetic photographs.


@pytest.mark.parametrize(
    "n_bright", [0, 3]
)  # the model's own candidates only, or with bright spots
@pytest.mark.parametrize(
    "shape,centre,diameter",
    [
        ((600, 800), (300, 250), 90),  # left of centre, a typical size
        ((600, 800), (280, 560), 60),  # right of centre, small (0.075 of the field)
        ((600, 800), (330, 420), 170),  # large (0.21 of the field)
        ((500, 500), (180, 130), 55),  # square frame, upper left
    ],
)
def test_locate_disc_finds_the_exact_centre(shape, centre, diameter, n_bright):
    photo, mask = synth_photo(shape, discs=((centre, diameter),))
    loc = localise.locate_disc(photo, fake_predict, FRAMING, S, n_bright=n_bright)
    true_centre = centroid(mask < 255)
    true_d = photo_checks.equivalent_diameter((mask < 255).sum())
    assert loc.found and loc.flags == {}, loc.message()
    err = math.dist(loc.centre, true_centre)
    # Exact up to the resampling to the network's grid: under half a photograph pixel.
    assert err <= 0.5, (loc.centre, true_centre)
    assert loc.diameter == pytest.approx(true_d, rel=0.02)
    assert loc.box.side == pytest.approx(true_d / FRAMING, rel=0.04)
    assert math.dist(loc.box.centre, true_centre) <= 1.0
    assert loc.confidence > 0.5
    # A few windows, not a sliding window at every pixel.
    assert loc.n_windows < 300


def test_locate_disc_batches_at_a_few_sizes():
    sizes = []

    def counting(regions):
        sizes.append(len(regions))
        return fake_predict(regions)

    photo, _ = synth_photo()
    loc = localise.locate_disc(photo, counting, FRAMING, S, batch_size=16)
    # Padded to a few sizes: a jitted model compiles once for each.
    assert set(sizes) <= {4, 8, 16} and photos.batch_sizes(16) == [4, 8, 16]
    assert sum(sizes) < 1.3 * loc.n_windows  # little padding
    assert loc.found


def test_locate_disc_prefers_a_confident_disc_over_a_faint_spot_and_a_reflex():
    photo, mask = synth_photo(discs=(((300, 560), 80),), faint=(((300, 230), 80),))
    # A bright reflex the model does not take for a disc, brighter and larger than the disc.
    photo[disc_pixels(mask.shape, (150, 400), 110)] = REFLEX
    assert np.mean(REFLEX) > np.mean(DISC)
    assert (
        math.dist(
            photo_checks.bright_spots(photo, photo_checks.field_of_view(photo), 80, 1)[0],
            (150, 400),
        )
        < 20
    )
    loc = localise.locate_disc(photo, fake_predict, FRAMING, S)
    assert loc.found and "two_candidates" not in loc.flags
    assert math.dist(loc.centre, centroid(mask < 255)) < 2


def hallucinating_predict(regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A model trained only on disc-centred regions: where it sees no disc it makes one up, a
    confident disc at the window's centre at the training framing (with a doubtful edge)."""
    p, u = fake_predict(regions)
    rr, cc = np.mgrid[:S, :S]
    made_up = (rr - (S - 1) / 2) ** 2 + (cc - (S - 1) / 2) ** 2 <= (FRAMING * S / 2) ** 2
    for i in range(len(regions)):
        if (p[i] > 0.5).sum() < 20:
            p[i] = np.where(made_up, 0.95, 0.0)
            u[i] = np.where(made_up, 0.3, 0.0)
    return p, u


def test_hallucinated_discs_do_not_win():
    photo, mask = synth_photo(discs=(((320, 560), 80),))
    loc = localise.locate_disc(photo, hallucinating_predict, FRAMING, S)
    assert loc.found and "two_candidates" not in loc.flags, loc.message()
    assert math.dist(loc.centre, centroid(mask < 255)) < 1
    assert loc.candidates[0].anchoring > 0.9
    assert all(c.anchoring < 0.5 for c in loc.candidates[1:])
    # Without a disc, every made-up disc moves with its window: none is accepted.
    empty, _ = synth_photo(discs=())
    loc = localise.locate_disc(empty, hallucinating_predict, FRAMING, S)
    assert not loc.found and "anchoring" in loc.flags["no_disc"]


def test_two_discs_are_flagged():
    photo, _ = synth_photo(discs=(((300, 230), 80), ((300, 570), 80)))
    loc = localise.locate_disc(photo, fake_predict, FRAMING, S)
    assert loc.found
    assert "two_candidates" in loc.flags
    assert "disc diameters away" in loc.flags["two_candidates"]
    assert "two_candidates" in loc.as_row()["loc_flags"]


def test_no_disc_is_flagged():
    photo, _ = synth_photo(discs=())
    loc = localise.locate_disc(photo, fake_predict, FRAMING, S)
    assert not loc.found and loc.box is None
    assert "no disc in any of" in loc.flags["no_disc"]
    assert loc.message().startswith("no disc")


def test_disc_at_the_border_is_flagged():
    # A frame without the dark border (cropped inside the field): the disc cut by the left edge.
    photo, mask = synth_photo((500, 700), discs=(((250, 20), 90),), fov=False)
    loc = localise.locate_disc(photo, fake_predict, FRAMING, S)
    assert loc.centre is not None
    assert "at_edge" in loc.flags and "left border" in loc.flags["at_edge"]
    assert math.dist(loc.centre, centroid(mask < 255)) < 3


# ---------------------------------------------------------------------------------------------
# Crop and paste-back.


def test_paste_back_of_a_perfect_region_reproduces_the_mask():
    photo, mask = synth_photo(discs=(((300, 60), 100),))
    od = mask < 255
    r, c = centroid(od)
    box = photos.Box.around(r, c, 100 / FRAMING)
    assert box.left < 0  # the box leaves the image: padding and clipping both exercised
    region = photos.crop_region(mask, box, pad_value=255, nearest=True)
    assert region.shape == (box.side, box.side)
    for truth in (od, mask == 0):  # disc and cup
        structure = (region < 255) if truth is od else (region == 0)
        back = photos.paste_back(structure.astype(np.float32), box, photo.shape)
        assert back.shape == od.shape
        np.testing.assert_array_equal(back > 0.5, truth)
    # Several channels at once, and the fill outside the box.
    two = np.stack([region < 255, region == 0], -1).astype(np.float32)
    back = photos.paste_back(two, box, photo.shape)
    np.testing.assert_array_equal(back[..., 0] > 0.5, od)
    assert back[:, box.left + box.side :].max() == 0.0


def test_paste_back_from_the_network_grid_is_close():
    photo, mask = synth_photo(discs=(((300, 250), 90),))
    od = mask < 255
    box = photos.Box.around(*centroid(od), 90 / FRAMING)
    prob, unc = photos.predict_photo(photo, box, fake_predict, S)
    pred = prob > 0.5
    dice = 2 * (pred & od).sum() / (pred.sum() + od.sum())
    assert dice > 0.97
    assert unc.shape == od.shape and unc.max() > 0.5  # the disc's edge is uncertain
    assert prob[: box.top].max() == 0.0 and unc[: box.top].max() == 0.0


def test_crop_region_pads_and_resizes_as_training():
    from data_builders.common import resize_image

    photo, _ = synth_photo()
    box = photos.Box(-10, 700, 150)  # past the top and the right border
    crop = photos.crop_region(photo, box)
    assert crop.shape == (150, 150, 3)
    assert (crop[:10] == 0).all() and (crop[:, 100:] == 0).all()
    np.testing.assert_array_equal(crop[10:, :100], photo[:140, 700:800])
    np.testing.assert_array_equal(photos.crop_region(photo, box, S), resize_image(crop, S, False))


# ---------------------------------------------------------------------------------------------
# Photograph or region.


def test_photograph_or_region_from_the_border():
    photo, mask = synth_photo()
    decision = photos.is_photograph(photo)
    assert decision.is_photograph and "corners dark" in decision.reason
    region = photos.crop_region(photo, photos.Box.around(*centroid(mask < 255), 150))
    assert not photos.is_photograph(region).is_photograph


def test_photograph_without_border_is_found_by_the_model():
    photo, mask = synth_photo((500, 700), discs=(((250, 200), 60),), fov=False)
    assert not photos.is_photograph(photo).is_photograph  # the border alone cannot tell
    decision = photos.is_photograph(photo, fake_predict, FRAMING, S)
    assert decision.is_photograph and "cropped inside its field of view" in decision.reason
    region = photos.crop_region(photo, photos.Box.around(*centroid(mask < 255), 100))
    decision = photos.is_photograph(region, fake_predict, FRAMING, S)
    assert not decision.is_photograph and decision.cues["disc_ratio"] > 0.5


# ---------------------------------------------------------------------------------------------
# Bad photographs: one clear message per image.


def test_bad_photographs_raise_per_image(tmp_path):
    grey = np.full((400, 400, 3), 128, np.uint8)
    with pytest.raises(photo_checks.PhotoError, match="uniform") as e:
        localise.locate_disc(grey, fake_predict, FRAMING, S, name="grey")
    assert e.value.kind == "uniform" and str(e.value).startswith("grey: ")
    tiny, _ = synth_photo((40, 50), discs=())
    with pytest.raises(photo_checks.PhotoError, match="smaller than the network input") as e:
        photo_checks.check_photo(tiny, S)
    assert e.value.kind == "too_small"
    photo, mask = synth_photo()
    with pytest.raises(photo_checks.PhotoError, match="photograph's grid") as e:
        photo_checks.check_mask(mask[:, :-1], photo.shape, "m")
    assert e.value.kind == "mask_shape"
    bad = mask.copy()
    bad[0, 0] = 7
    with pytest.raises(photo_checks.PhotoError) as e:
        photo_checks.check_mask(bad, photo.shape)
    assert e.value.kind == "mask_values"
    np.testing.assert_array_equal(photo_checks.check_mask(mask, photo.shape), mask)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png")
    with pytest.raises(photo_checks.PhotoError) as e:
        photo_checks.read_photo(junk)
    assert e.value.kind == "unreadable" and e.value.name == "junk"
    # A good photograph after the bad ones is processed as ever.
    Image.fromarray(photo).save(tmp_path / "ok.png")
    ok = photo_checks.read_photo(tmp_path / "ok.png")
    assert localise.locate_disc(ok, fake_predict, FRAMING, S).found


# ---------------------------------------------------------------------------------------------
# Real data: the shared photographs and regions.


def _real_mask(path):
    return photo_checks.read_mask(path)


@pytest.mark.real_data
def test_real_photographs_and_regions_are_told_apart(shared_data):
    photo_paths = sorted((shared_data / "fundus_photos").glob("*/image/*.png"))
    assert len(photo_paths) == 12
    for p in photo_paths:
        d = photos.is_photograph(photo_checks.read_photo(p))
        assert d.is_photograph, (p.name, d.reason)
    # Every 8th region of each domain, and Domain3's with two dark corners (near the field's edge).
    regions = []
    for dom in ("Domain1", "Domain2", "Domain3", "Domain4"):
        regions += sorted((shared_data / "fundus" / dom).glob("*/ROIs/image/*.png"))[::8]
    for p in regions:
        d = photos.is_photograph(photo_checks.read_photo(p))
        assert not d.is_photograph, (p, d.reason)


@pytest.mark.real_data
def test_real_training_framing(shared_data):
    masks = [
        _real_mask(p) for p in sorted((shared_data / "fundus/Domain3/train/ROIs/mask").glob("*"))
    ][::10]
    fr = photos.training_framing(masks)
    assert 0.5 < fr.value < 0.7 and fr.n == len(masks)


@pytest.mark.real_data
def test_real_photograph_paste_back_identity(shared_data):
    root = shared_data / "fundus_photos/REFUGE_train"
    photo = photo_checks.read_photo(root / "image/n0015.png")
    mask = photo_checks.check_mask(_real_mask(root / "mask/n0015.png"), photo.shape)
    od = mask < 255
    d = photo_checks.equivalent_diameter(od.sum())
    box = photos.Box.around(*centroid(od), d / FRAMING)
    region = photos.crop_region(mask, box, pad_value=255, nearest=True)
    back = photos.paste_back((region < 255).astype(np.float32), box, photo.shape)
    np.testing.assert_array_equal(back > 0.5, od)


@pytest.mark.real_data
def test_locate_a_real_shaped_disc(shared_data):
    """A Domain3 disc's real outline, drawn into a synthetic photograph at another scale."""
    mask = _real_mask(sorted((shared_data / "fundus/Domain3/train/ROIs/mask").glob("*"))[0])
    od = Image.fromarray(((mask < 255) * 255).astype(np.uint8)).resize((230, 230), Image.NEAREST)
    od = np.asarray(od) > 127
    rows, cols = np.nonzero(od)
    shape = (700, 900)
    photo, _ = synth_photo(shape, discs=())
    top, left = 230, 120
    truth = np.zeros(shape, bool)
    truth[top : top + 230, left : left + 230] = od
    photo[truth] = DISC
    loc = localise.locate_disc(photo, fake_predict, FRAMING, S)
    assert loc.found and loc.flags == {}, loc.message()
    d = photo_checks.equivalent_diameter(truth.sum())
    assert math.dist(loc.centre, centroid(truth)) <= 0.02 * d
