"""Whole fundus photographs in, disc and cup out: find the disc, crop, paste back (issue 22).

Every fundus model of this repository is trained on regions of interest around the optic disc
(the DoFE layout): the disc fills a large, fairly constant fraction of the region. A clinic has
whole photographs, where the disc is a small spot anywhere in the field of view; resizing such a
photograph to the network's input shrinks the disc to a few pixels. This module turns a
photograph into the region the model was trained on and the region's prediction back into the
photograph's grid:

* `check_photo` / `check_mask` / `read_photo` / `read_mask`: the per-image checks (a grey or
  constant image, an image smaller than the network input, a mask of another size or with other
  values than 0/128/255) raise `PhotoError`, whose `kind` and message a command line can print
  before going on with the other images.
* `is_photograph`: whole photograph or disc-centred region, decided per image from the dark
  border around a photograph's circular field of view (and, when given a model, from how large
  the model sees the disc in the whole image).
* `training_framing`: the disc's diameter relative to the region's side, as in the run's own
  training masks (passed in as arrays; never a typed constant).
* `locate_disc`: finds the disc with the trained model itself: a coarse pass of windows of the
  training framing over the field of view, where the windows vote for the places they see a
  disc (a model trained on regions that always hold a disc makes one up in almost any window,
  but such discs do not agree between overlapping windows), then refinement (a window of the
  training framing re-centred on the predicted disc) and verification (shifted windows: a
  real disc stays put, a made-up one moves with the window). Returns a `Localisation` with its
  crop box, a confidence and the flags `no_disc`, `two_candidates`, `at_edge` with reasons.
* `crop_region` / `paste_back` / `predict_photo`: the crop (padded with black where the box leaves
  the image, as outside a photograph's field of view) and the bilinear write-back of the region's
  probabilities and uncertainty onto the photograph's grid (zero outside the box), so that
  predictions, masks and scores live on the photograph's own grid.

The model enters only through `predict_fn(regions) -> (disc probability, uncertainty)`:

    regions: uint8 [N, s, s, 3], RGB crops resized to the network input exactly as the training
      pipeline resizes its images (PIL bilinear, antialiased when shrinking; `resize_rgb`);
      normalising them as the run's `data.normalize` does is the predict function's job;
    returns: (disc probability [N, s, s], uncertainty [N, s, s]), both float in [0, 1].

Geometry: rows and columns are array indices (pixel centres at integer positions); a `Box` is a
square (top, left, side) in photograph pixels, and may extend beyond the image.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from puseg_jax import resample

# A predict function: uint8 [N, s, s, 3] regions -> (disc probability, uncertainty), [N, s, s].
PredictFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

# The release's mask convention (0 cup, 128 disc rim, 255 background) and the TFDS class indices
# the fundus builder stores (0 background, 1 rim, 2 cup).
MASK_VALUES = (0, 128, 255)
CONVENTIONS = ("release", "classes")

# Disc probability above which a pixel is disc (the eval default `eval.threshold`).
DISC_THRESHOLD = 0.5

# A pixel is "dark" (outside the field of view) below max(DARK_MIN, DARK_FRACTION * the image's
# 90th luminance percentile): photographs have a black surround (0-5 levels) while even the
# darkest retina in the shared photographs (PAPILA, 90th percentile ~50) stays above 8.
DARK_MIN = 8.0
DARK_FRACTION = 0.08
# Corner patches of this fraction of the short side; a corner is dark when more than half its
# pixels are. All four corners are dark in every shared photograph; no DoFE region has more
# than two (Domain3's regions near the field-of-view edge have one or two).
CORNER_FRACTION = 0.08
PHOTO_DARK_CORNERS = 3
# With a model: a disc seen (whole image resized to the input) smaller than this fraction of the
# training framing means the image shows much more than a region (a photograph without border).
PHOTO_DISC_RATIO = 0.35

# Below these an image holds no usable picture: a constant or grey image (std in 8-bit levels,
# and the spread between the 1st and 99th luminance percentiles).
MIN_STD = 2.0
MIN_SPREAD = 8.0

# The field of view is found on a copy of at most this side (speed; it is a coarse shape).
FOV_GRID = 256


class PhotoError(ValueError):
    """A photograph or mask that cannot be processed; the others can still be.

    Attributes:
      kind: 'unreadable', 'uniform', 'too_small', 'mask_shape' or 'mask_values'.
      name: the image's name (may be '').
    """

    def __init__(self, kind: str, message: str, name: str = ""):
        self.kind = kind
        self.name = name
        super().__init__(f"{name}: {message}" if name else message)


# ---------------------------------------------------------------------------------------------
# Reading and checking.


def read_photo(path: str | Path) -> np.ndarray:
    """A photograph as uint8 RGB [H, W, 3] (grey, palette and RGBA images are converted).

    Raises:
      PhotoError('unreadable'): not an image PIL can open.
    """
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise PhotoError(
            "unreadable", f"cannot read {path} as an image ({e})", Path(path).stem
        ) from e


def read_mask(path: str | Path) -> np.ndarray:
    """A mask as uint8 [H, W] (RGB masks must have equal channels; checked by `check_mask`)."""
    try:
        with Image.open(path) as im:
            array = np.asarray(im)
    except (OSError, ValueError) as e:
        raise PhotoError(
            "unreadable", f"cannot read {path} as a mask ({e})", Path(path).stem
        ) from e
    if array.ndim == 3:
        if array.shape[-1] == 4:
            array = array[..., :3]
        if not (array == array[..., :1]).all():
            raise PhotoError(
                "mask_values",
                f"{path} is a colour mask; expected grey 0 cup / 128 rim / 255 background",
                Path(path).stem,
            )
        array = array[..., 0]
    return array.astype(np.uint8)


def luminance(image: np.ndarray) -> np.ndarray:
    """Mean of the RGB channels, float32 [H, W] (8-bit levels)."""
    image = np.asarray(image)
    return image.mean(axis=-1, dtype=np.float32) if image.ndim == 3 else image.astype(np.float32)


def check_photo(image: np.ndarray, input_size: int, name: str = "") -> np.ndarray:
    """Checks that an image can be searched for a disc; returns it as uint8 RGB.

    Args:
      image: uint8 [H, W, 3] (or [H, W]: grey, converted).
      input_size: the network input side s; a smaller image has no region to crop at the
        training framing without making up pixels.
      name: the image's name, for the message.

    Returns:
      uint8 [H, W, 3].

    Raises:
      PhotoError('too_small'): a side under `input_size`.
      PhotoError('uniform'): a grey or constant image (nothing to find).
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise PhotoError("unreadable", f"expected an RGB image [H, W, 3], got {image.shape}", name)
    if image.dtype != np.uint8:
        raise PhotoError("unreadable", f"expected 8-bit pixels, got {image.dtype}", name)
    h, w = image.shape[:2]
    if min(h, w) < input_size:
        raise PhotoError(
            "too_small",
            f"image of {h}x{w} is smaller than the network input {input_size}x{input_size}: "
            "too small for a fundus photograph",
            name,
        )
    lum = luminance(image[:: max(1, h // 512), :: max(1, w // 512)])
    lo, hi = np.percentile(lum, [1, 99])
    if float(lum.std()) < MIN_STD or hi - lo < MIN_SPREAD:
        raise PhotoError(
            "uniform",
            f"image is uniform (luminance {lo:.0f}-{hi:.0f}, std {lum.std():.1f}): a grey or "
            "blank image, no fundus to find",
            name,
        )
    return image


def check_mask(
    mask: np.ndarray, photo_shape: Sequence[int], name: str = "", convention: str = "release"
) -> np.ndarray:
    """Checks a photograph's mask: its size and values; returns it as uint8 [H, W].

    Args:
      mask: [H, W] (or [H, W, C] with equal channels).
      photo_shape: the photograph's shape (H, W, ...): the mask must be on its grid.
      name: the image's name, for the message.
      convention: 'release' (0 cup, 128 rim, 255 background) or 'classes' (0, 1, 2).

    Raises:
      PhotoError('mask_shape'): another size than the photograph.
      PhotoError('mask_values'): values outside the convention.
    """
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    if tuple(mask.shape) != tuple(photo_shape[:2]):
        raise PhotoError(
            "mask_shape",
            f"mask of {mask.shape[0]}x{mask.shape[1]} for a photograph of "
            f"{photo_shape[0]}x{photo_shape[1]}: a mask must be drawn on the photograph's grid",
            name,
        )
    allowed = MASK_VALUES if convention == "release" else (0, 1, 2)
    values = np.unique(mask)
    bad = sorted(set(values.tolist()) - set(allowed))
    if bad:
        raise PhotoError(
            "mask_values",
            f"mask values {bad[:5]} outside {allowed} ({convention} convention: 0 cup, 128 disc "
            "rim, 255 background)",
            name,
        )
    return mask.astype(np.uint8)


def disc_of(mask: np.ndarray, convention: str = "release") -> np.ndarray:
    """The optic disc (rim and cup) of a mask: bool [H, W]."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    return mask < 255 if convention == "release" else mask > 0


def equivalent_diameter(area: float) -> float:
    """The diameter of the circle of this area: 2 sqrt(area / pi). Used for every disc size
    here (training masks, predictions), so that the framing and the measurements agree."""
    return 2.0 * math.sqrt(max(float(area), 0.0) / math.pi)


# ---------------------------------------------------------------------------------------------
# Framing of the training regions.


@dataclasses.dataclass(frozen=True)
class Framing:
    """How large the disc is in the training regions.

    Attributes:
      value: median over the training masks of disc diameter / region side (diameter of the
        circle of the disc's area; side sqrt(H * W)).
      low, high: 10th and 90th percentiles (the spread the model saw).
      n: masks with a disc.
      n_empty: masks without one (not counted).
    """

    value: float
    low: float
    high: float
    n: int
    n_empty: int = 0

    def describe(self) -> str:
        return (
            f"disc diameter {self.value:.2f} of the region side (median of {self.n} training "
            f"masks, 10-90 % {self.low:.2f}-{self.high:.2f})"
        )


def training_framing(masks: Iterable[np.ndarray], convention: str = "release") -> Framing:
    """The disc size relative to the region, as in the run's own training data.

    Args:
      masks: the training regions' masks, each [H, W] (or [H, W, 1|3]), as the model saw them
        (after the builder's centre crop): the caller reads them from the run's training domains.
      convention: 'release' (0/128/255 files: disc = mask < 255) or 'classes' (the TFDS class
        indices 0 background, 1 rim, 2 cup: disc = mask > 0).

    Returns:
      The `Framing` (median and spread of disc diameter / region side).

    Raises:
      ValueError: no mask holds a disc.
    """
    ratios, empty = [], 0
    for mask in masks:
        od = disc_of(mask, convention)
        area = int(od.sum())
        if area == 0:
            empty += 1
            continue
        ratios.append(equivalent_diameter(area) / math.sqrt(od.shape[0] * od.shape[1]))
    if not ratios:
        raise ValueError(f"no training mask holds a disc ({empty} empty): no framing to learn")
    r = np.asarray(ratios)
    return Framing(
        value=float(np.median(r)),
        low=float(np.percentile(r, 10)),
        high=float(np.percentile(r, 90)),
        n=len(ratios),
        n_empty=empty,
    )


def _framing_value(framing: Framing | float) -> float:
    value = framing.value if isinstance(framing, Framing) else float(framing)
    if not 0.0 < value < 1.5:
        raise ValueError(f"framing {value} is not a disc-diameter-to-region-side ratio")
    return value


# ---------------------------------------------------------------------------------------------
# Boxes, crops and the write-back.


@dataclasses.dataclass(frozen=True)
class Box:
    """A square window in photograph pixels: rows top..top+side-1, columns left..left+side-1.
    It may extend beyond the image (the crop is padded there)."""

    top: int
    left: int
    side: int

    @classmethod
    def around(cls, row: float, col: float, side: float) -> Box:
        """The square of `side` (rounded, at least 1) centred on (row, col) (index coordinates:
        the window's continuous centre top + side/2 is at row + 0.5)."""
        s = max(1, int(round(side)))
        return cls(int(round(row + 0.5 - s / 2)), int(round(col + 0.5 - s / 2)), s)

    @property
    def centre(self) -> tuple[float, float]:
        """(row, col) of the window's centre in index coordinates."""
        return self.top + self.side / 2 - 0.5, self.left + self.side / 2 - 0.5

    def outside(self, shape: Sequence[int]) -> int:
        """How many pixels the box reaches beyond the image on its worst side (0: inside)."""
        h, w = shape[:2]
        return max(0, -self.top, -self.left, self.top + self.side - h, self.left + self.side - w)

    def as_tuple(self) -> tuple[int, int, int]:
        return self.top, self.left, self.side


def resize_rgb(region: np.ndarray, size: int) -> np.ndarray:
    """uint8 [h, w, 3] -> [size, size, 3] as the training pipeline resizes images
    (`data_builders.common.resize_image`: PIL bilinear, antialiased when shrinking)."""
    if region.shape[0] == size and region.shape[1] == size:
        return region
    return np.asarray(Image.fromarray(region, "RGB").resize((size, size), Image.BILINEAR))


def crop_region(
    image: np.ndarray,
    box: Box,
    size: int | None = None,
    pad_value: float = 0,
    nearest: bool = False,
) -> np.ndarray:
    """The box's pixels, padded with `pad_value` where it leaves the image, optionally resized.

    Args:
      image: [H, W] or [H, W, C] (a photograph, a mask, a probability map).
      box: the window.
      size: resize the crop to [size, size] (None: keep the box's side, the native grid). uint8
        RGB images are resized as in training (`resize_rgb`); other arrays per channel with PIL
        (bilinear, or nearest for masks).
      pad_value: the value outside the image: 0 (black, as outside a photograph's field of view)
        for photographs, 255 (background) for release masks.
      nearest: nearest-neighbour resizing (masks).

    Returns:
      [side, side(, C)] or [size, size(, C)], the image's dtype.
    """
    image = np.asarray(image)
    h, w = image.shape[:2]
    out = np.full((box.side, box.side) + image.shape[2:], pad_value, image.dtype)
    r0, c0 = max(box.top, 0), max(box.left, 0)
    r1, c1 = min(box.top + box.side, h), min(box.left + box.side, w)
    if r1 > r0 and c1 > c0:
        out[r0 - box.top : r1 - box.top, c0 - box.left : c1 - box.left] = image[r0:r1, c0:c1]
    if size is None or size == box.side:
        return out
    if out.dtype == np.uint8 and out.ndim == 3 and out.shape[-1] == 3 and not nearest:
        return resize_rgb(out, size)
    resample_mode = Image.NEAREST if nearest else Image.BILINEAR
    planes = out[..., None] if out.ndim == 2 else out
    mode_dtype = np.uint8 if out.dtype == np.uint8 else np.float32
    resized = [
        np.asarray(
            Image.fromarray(planes[..., c].astype(mode_dtype)).resize((size, size), resample_mode)
        )
        for c in range(planes.shape[-1])
    ]
    result = np.stack(resized, axis=-1).astype(out.dtype)
    return result[..., 0] if out.ndim == 2 else result


def paste_back(
    region: np.ndarray, box: Box, photo_shape: Sequence[int], fill: float = 0.0
) -> np.ndarray:
    """A region's map resampled onto the photograph's grid.

    The region (any size: the network's grid, or the box's own side) is resized bilinearly with
    half-pixel centres to the box's side (`resample.resize_bilinear`, as the evaluation brings
    the network's probabilities to the native grid) and placed at the box; outside the box the
    map is `fill` (0: no disc, no uncertainty: not predicted there).

    Args:
      region: [h, w] or [h, w, C] float (probabilities, uncertainty).
      box: where the region was cropped.
      photo_shape: (H, W, ...) of the photograph.
      fill: the value outside the box.

    Returns:
      float32 [H, W] or [H, W, C].
    """
    region = np.asarray(region, np.float32)
    h, w = int(photo_shape[0]), int(photo_shape[1])
    native = resample.resize_bilinear(region, (box.side, box.side))
    out = np.full((h, w) + region.shape[2:], fill, np.float32)
    r0, c0 = max(box.top, 0), max(box.left, 0)
    r1, c1 = min(box.top + box.side, h), min(box.left + box.side, w)
    if r1 > r0 and c1 > c0:
        out[r0:r1, c0:c1] = native[r0 - box.top : r1 - box.top, c0 - box.left : c1 - box.left]
    return out


# ---------------------------------------------------------------------------------------------
# Field of view; photograph or region.


@dataclasses.dataclass(frozen=True)
class FieldOfView:
    """The bright (non-surround) part of a photograph, on a coarse grid.

    Attributes:
      mask: bool [h, w], the largest bright component with its holes filled, on a grid of
        `scale` photograph pixels per cell.
      scale: photograph pixels per cell (>= 1).
      bbox: (top, left, bottom, right) in photograph pixels (bottom/right exclusive).
      found: False when no dark surround exists (the whole image is taken as the field).
    """

    mask: np.ndarray
    scale: float
    bbox: tuple[int, int, int, int]
    found: bool

    @property
    def diameter(self) -> float:
        """The field of view's diameter: its wider extent (a circle cut at the top and bottom
        by the frame keeps its full width)."""
        top, left, bottom, right = self.bbox
        return float(max(bottom - top, right - left))

    def coverage(self, box: Box) -> float:
        """Fraction of the box inside the field of view."""
        s = self.scale
        h, w = self.mask.shape
        r0, c0 = int(math.floor(box.top / s)), int(math.floor(box.left / s))
        r1, c1 = int(math.ceil((box.top + box.side) / s)), int(math.ceil((box.left + box.side) / s))
        cells = max(1, (r1 - r0) * (c1 - c0))
        inside = self.mask[max(r0, 0) : max(min(r1, h), 0), max(c0, 0) : max(min(c1, w), 0)]
        return float(inside.sum()) / cells

    def fraction_outside(self, row: float, col: float, radius: float) -> float:
        """Fraction of the disc of this radius (photograph pixels) outside the field of view
        (outside the image counts as outside)."""
        s = self.scale
        h, w = self.mask.shape
        rr, cc = np.mgrid[-1:1:24j, -1:1:24j]
        keep = rr**2 + cc**2 <= 1
        r = ((row + rr[keep] * radius) / s).astype(int)
        c = ((col + cc[keep] * radius) / s).astype(int)
        valid = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        inside = np.zeros(r.shape, bool)
        inside[valid] = self.mask[r[valid], c[valid]]
        return float(1.0 - inside.mean())


def dark_threshold(lum: np.ndarray) -> float:
    """Luminance below which a pixel is the dark surround of a photograph."""
    return max(DARK_MIN, DARK_FRACTION * float(np.percentile(lum, 90)))


def field_of_view(image: np.ndarray) -> FieldOfView:
    """The photograph's field of view: its largest non-dark component, holes filled.

    Args:
      image: uint8 [H, W, 3].

    Returns:
      The `FieldOfView`; with no dark surround (a region, or a photograph cropped inside its
      field), the whole image.
    """
    h, w = image.shape[:2]
    step = max(1, int(math.ceil(max(h, w) / FOV_GRID)))
    lum = luminance(image[::step, ::step])
    bright = lum >= dark_threshold(lum)
    labels, n = ndimage.label(bright)
    if n == 0:
        mask = np.ones_like(bright)
    else:
        sizes = np.bincount(labels.ravel())[1:]
        mask = ndimage.binary_fill_holes(labels == (1 + int(np.argmax(sizes))))
    found = bool(mask.mean() < 0.98)
    if not found:
        mask = np.ones_like(bright)
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    bbox = (
        int(rows[0] * step),
        int(cols[0] * step),
        int(min(h, (rows[-1] + 1) * step)),
        int(min(w, (cols[-1] + 1) * step)),
    )
    return FieldOfView(mask=mask, scale=float(step), bbox=bbox, found=found)


def dark_corners(image: np.ndarray) -> list[float]:
    """Fraction of dark pixels in each corner patch (top-left, top-right, bottom-left,
    bottom-right)."""
    h, w = image.shape[:2]
    k = max(1, int(CORNER_FRACTION * min(h, w)))
    step = max(1, k // 64)  # a sample of each patch is enough
    thr = dark_threshold(luminance(image[:: max(1, h // 256), :: max(1, w // 256)]))
    patches = (image[:k, :k], image[:k, -k:], image[-k:, :k], image[-k:, -k:])
    return [float((luminance(p[::step, ::step]) < thr).mean()) for p in patches]


@dataclasses.dataclass(frozen=True)
class PhotoDecision:
    """Whole photograph or disc-centred region, and why.

    Attributes:
      is_photograph: True for a whole photograph (locate the disc first).
      reason: one line for the console.
      cues: the numbers behind it ('dark_corners', and with a model 'disc_ratio': the disc
        diameter the model sees in the whole image resized, over the image side).
    """

    is_photograph: bool
    reason: str
    cues: dict[str, Any]


def _whole_image_disc(image: np.ndarray, predict_fn: PredictFn, input_size: int) -> float:
    """Disc diameter / side as the model sees the whole image resized to its input (0: none)."""
    h, w = image.shape[:2]
    side = max(h, w)
    box = Box((h - side) // 2, (w - side) // 2, side)
    prob, _ = predict_fn(crop_region(image, box, input_size)[None])
    disc = _largest_component(np.asarray(prob[0]) > DISC_THRESHOLD)
    return equivalent_diameter(disc.sum()) / input_size


def is_photograph(
    image: np.ndarray,
    predict_fn: PredictFn | None = None,
    framing: Framing | float | None = None,
    input_size: int | None = None,
) -> PhotoDecision:
    """Decides whether an image is a whole fundus photograph or a disc-centred region.

    The cue that needs no model: a photograph's field of view is a circle (sometimes cut at the
    top and bottom) on a black surround, so at least three of its four corners are dark; a
    region of interest cropped around the disc is retina almost everywhere (DoFE regions near
    the field of view's edge show one or two dark corners, never three). With a model
    (`predict_fn`, `framing`, `input_size`), an image without that border is still a photograph
    when the model, shown the whole image, sees a disc far smaller than in training (less than
    `PHOTO_DISC_RATIO` of the framing) or none: a photograph cropped inside its field of view.

    Args:
      image: uint8 [H, W, 3].
      predict_fn: optional, the model (see the module's docstring).
      framing: with `predict_fn`: the training framing.
      input_size: with `predict_fn`: the network input side.

    Returns:
      The `PhotoDecision`.
    """
    corners = dark_corners(image)
    n_dark = sum(c > 0.5 for c in corners)
    cues: dict[str, Any] = {"dark_corners": n_dark}
    if n_dark >= PHOTO_DARK_CORNERS:
        return PhotoDecision(
            True, f"{n_dark} of 4 corners dark: the black surround of a photograph", cues
        )
    if predict_fn is None or framing is None or input_size is None:
        return PhotoDecision(
            False, f"{n_dark} of 4 corners dark: retina to the corners, a region", cues
        )
    f = _framing_value(framing)
    ratio = _whole_image_disc(image, predict_fn, input_size)
    cues["disc_ratio"] = round(ratio, 3)
    if ratio < PHOTO_DISC_RATIO * f:
        seen = "no disc" if ratio == 0 else f"a disc of {ratio:.2f} of the side"
        return PhotoDecision(
            True,
            f"{n_dark} of 4 corners dark, but the model sees {seen} in the whole image against "
            f"{f:.2f} in training: a photograph cropped inside its field of view",
            cues,
        )
    return PhotoDecision(
        False,
        f"{n_dark} of 4 corners dark and the model sees a disc of {ratio:.2f} of the side "
        f"(training {f:.2f}): a region",
        cues,
    )


# ---------------------------------------------------------------------------------------------
# Locating the disc with the model.


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A disc the model predicted in one window, in photograph pixels.

    Attributes:
      centre: (row, col) of the predicted disc's centroid.
      diameter: its equivalent diameter.
      score: in [0, 1] (see `_measure`; after verification times `anchoring`).
      box: the window it was predicted in.
      ratio: the predicted diameter over the window's side (the framing the model saw).
      probability, uncertainty: mean disc probability and mean uncertainty inside the disc.
      fill: disc area over the area of the ellipse in its bounding box (1 for an ellipse).
      touches_edge: the disc touches the window's edge (cut off: centre and size biased).
      votes: coarse pass: the summed scores of the windows that see a disc at this place.
      anchoring: after verification: 1 when windows shifted around the disc see it at the same
        place in the photograph, 0 when the predicted disc moves with the window.
    """

    centre: tuple[float, float]
    diameter: float
    score: float
    box: Box
    ratio: float
    probability: float
    uncertainty: float
    fill: float
    touches_edge: bool
    votes: float = 0.0
    anchoring: float = 1.0


def _size_match(ratio: float, framing: float, tolerance: float) -> float:
    """exp(-(ln(ratio / framing) / ln(tolerance))^2 / 2): 1 at the framing, 0.61 at a factor of
    `tolerance` either way."""
    return math.exp(-0.5 * (math.log(ratio / framing) / math.log(tolerance)) ** 2)


def _measure(
    prob: np.ndarray, unc: np.ndarray, box: Box, framing: float, tolerance: float
) -> Candidate | None:
    """The disc predicted in one window, or None (no pixel above the threshold)."""
    s = prob.shape[0]
    disc = _largest_component(prob > DISC_THRESHOLD)
    area = int(disc.sum())
    if area == 0:
        return None
    rows, cols = np.nonzero(disc)
    scale = box.side / s  # photograph pixels per network pixel
    # Index coordinates on the network grid -> continuous -> photograph index coordinates.
    row = box.top + (rows.mean() + 0.5) * scale - 0.5
    col = box.left + (cols.mean() + 0.5) * scale - 0.5
    diameter_net = equivalent_diameter(area)
    bbox_h, bbox_w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    fill = min(1.0, area / (math.pi / 4 * bbox_h * bbox_w))
    touches = bool(rows.min() == 0 or cols.min() == 0 or rows.max() == s - 1 or cols.max() == s - 1)
    p_in = float(prob[disc].mean())
    u_in = float(np.clip(unc[disc], 0.0, 1.0).mean())
    ratio = diameter_net / s
    # Why these factors: a real disc is predicted with high probability and low uncertainty
    # inside (hallucinated discs in vessels or bright reflexes are doubtful), as one compact
    # ellipse, at about the framing the model was trained on, and whole (not cut by the window).
    score = (
        p_in
        * (1.0 - u_in)
        * fill
        * _size_match(ratio, framing, tolerance)
        * (0.5 if touches else 1.0)
    )
    return Candidate(
        centre=(float(row), float(col)),
        diameter=float(diameter_net * scale),
        score=float(score),
        box=box,
        ratio=float(ratio),
        probability=p_in,
        uncertainty=u_in,
        fill=float(fill),
        touches_edge=touches,
    )


def batch_sizes(batch_size: int, smallest: int = 4) -> list[int]:
    """The batch sizes `predict_boxes` calls `predict_fn` with: powers of two from `smallest`
    up to `batch_size` (and `batch_size` itself). A jitted model compiles once per size; padding
    a refinement step of 3 windows to 32 would cost ten times its work."""
    sizes, b = [], smallest
    while b < batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [batch_size]


def predict_boxes(
    photo: np.ndarray,
    boxes: Sequence[Box],
    predict_fn: PredictFn,
    input_size: int,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """The model on a list of windows, in batches of at most `batch_size`, each padded with
    black windows to one of `batch_sizes(batch_size)` (a jitted model compiles for a few sizes
    only).

    Returns:
      (disc probability [N, s, s], uncertainty [N, s, s]) float32.
    """
    sizes = batch_sizes(batch_size)
    probs, uncs = [], []
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i : i + batch_size]
        padded = next(b for b in sizes if b >= len(chunk))
        batch = np.zeros((padded, input_size, input_size, 3), np.uint8)
        for j, box in enumerate(chunk):
            batch[j] = crop_region(photo, box, input_size)
        p, u = predict_fn(batch)
        probs.append(np.asarray(p, np.float32)[: len(chunk)])
        uncs.append(np.asarray(u, np.float32)[: len(chunk)])
    if not probs:
        empty = np.zeros((0, input_size, input_size), np.float32)
        return empty, empty
    return np.concatenate(probs), np.concatenate(uncs)


def coarse_boxes(
    photo_shape: Sequence[int],
    fov: FieldOfView,
    framing: float,
    disc_scales: Sequence[float],
    stride: float,
    min_coverage: float = 0.25,
) -> list[Box]:
    """The coarse pass's windows: for each candidate disc diameter (a fraction of the field of
    view's diameter), windows of the training framing on a grid over the field of view.

    Args:
      photo_shape: (H, W, ...).
      fov: the field of view.
      framing: disc diameter / window side the windows are made for.
      disc_scales: candidate disc diameters as fractions of the field of view's diameter.
      stride: grid step as a fraction of the window side.
      min_coverage: windows with less of their area in the field of view are skipped.

    Returns:
      The windows, largest scale last.
    """
    top, left, bottom, right = fov.bbox
    boxes = []
    for q in disc_scales:
        side = max(8, int(round(q * fov.diameter / framing)))
        step = max(1.0, stride * side)
        centres = []
        for lo, hi in ((top, bottom), (left, right)):
            span = hi - lo
            if span <= side:
                centres.append(np.array([(lo + hi) / 2 - 0.5]))
            else:
                n = int(math.ceil((span - side) / step)) + 1
                centres.append(np.linspace(lo + side / 2, hi - side / 2, n) - 0.5)
        for r in centres[0]:
            for c in centres[1]:
                box = Box.around(float(r), float(c), side)
                if fov.coverage(box) >= min_coverage:
                    boxes.append(box)
    return boxes


@dataclasses.dataclass(frozen=True)
class Localisation:
    """Where the disc is in a photograph, the region to crop and how sure the search is.

    Attributes:
      centre: (row, col) of the disc in photograph pixels; None when no disc was found.
      diameter: the disc's equivalent diameter in photograph pixels (None: not found).
      box: the region to predict: centred on the disc, side diameter / framing (None: not
        found).
      confidence: the chosen candidate's score in [0, 1] (0: none).
      flags: {flag: reason} for 'no_disc', 'two_candidates', 'at_edge' (empty: no doubt).
      candidates: the refined candidates, best first.
      n_windows: windows predicted (coarse and refinement).
      seconds: wall time of the search.
    """

    centre: tuple[float, float] | None
    diameter: float | None
    box: Box | None
    confidence: float
    flags: dict[str, str]
    candidates: tuple[Candidate, ...] = ()
    n_windows: int = 0
    seconds: float = 0.0

    @property
    def found(self) -> bool:
        return self.box is not None and "no_disc" not in self.flags

    def message(self) -> str:
        """One console line."""
        if self.centre is None or self.box is None:
            where = "no disc"
        else:
            where = (
                f"disc at ({self.centre[0]:.0f}, {self.centre[1]:.0f}), diameter "
                f"{self.diameter:.0f} px, region {self.box.side} px, confidence "
                f"{self.confidence:.2f}"
            )
        doubts = "; ".join(f"{k}: {v}" for k, v in self.flags.items())
        return where + (f" [{doubts}]" if doubts else "")

    def as_row(self) -> dict[str, Any]:
        """Columns for review.csv / per-case tables."""
        c = self.centre or (math.nan, math.nan)
        b = self.box.as_tuple() if self.box else (None, None, None)
        return {
            "loc_row": round(c[0], 1),
            "loc_col": round(c[1], 1),
            "loc_diameter": None if self.diameter is None else round(self.diameter, 1),
            "loc_box": None if self.box is None else "{}/{}/{}".format(*b),
            "loc_confidence": round(self.confidence, 4),
            "loc_flags": "|".join(self.flags),
        }


def _suppress(
    cands: Sequence[Candidate], radius: float, keep: int, key: str = "score"
) -> list[Candidate]:
    """Best-first candidates (by `key`), dropping any within `radius` disc diameters of a kept
    one."""
    kept: list[Candidate] = []
    for c in sorted(cands, key=lambda c: -getattr(c, key)):
        far = all(
            math.dist(c.centre, k.centre) > radius * max(c.diameter, k.diameter) for k in kept
        )
        if far:
            kept.append(c)
        if len(kept) == keep:
            break
    return kept


def _vote(cands: Sequence[Candidate], radius: float) -> list[Candidate]:
    """Each candidate with `votes`: the summed scores of all candidates (its own included)
    whose centres lie within `radius` disc diameters of it.

    Why: a model trained on regions that always hold a disc "sees" a disc in almost any window,
    usually near the window's centre, at the training framing. Such hallucinations do not
    agree between overlapping windows (each sits at its own window's centre), while a real disc
    is predicted at the same place of the photograph by every window that shows it.
    """
    if not cands:
        return []
    centres = np.array([c.centre for c in cands])
    diameters = np.array([c.diameter for c in cands])
    scores = np.array([c.score for c in cands])
    dist = np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(-1))
    near = dist < radius * np.maximum(diameters[:, None], diameters[None])
    votes = near.astype(np.float64) @ scores
    return [dataclasses.replace(c, votes=float(v)) for c, v in zip(cands, votes, strict=True)]


def _shifted(box: Box, shift: float, diagonal: bool = False) -> list[Box]:
    """The box moved by `shift` of its side: up, down, left and right, or (`diagonal`) up-left
    and down-right."""
    d = int(round(shift * box.side))
    if diagonal:
        return [Box(box.top - d, box.left - d, box.side), Box(box.top + d, box.left + d, box.side)]
    return [
        Box(box.top - d, box.left, box.side),
        Box(box.top + d, box.left, box.side),
        Box(box.top, box.left - d, box.side),
        Box(box.top, box.left + d, box.side),
    ]


def _check(
    photo: np.ndarray,
    seeds: Sequence[Candidate],
    predict_fn: PredictFn,
    framing: float,
    input_size: int,
    shift: float,
    diagonal: bool,
    batch_size: int,
) -> tuple[list[Candidate], int]:
    """One refinement step with its anchoring test, for every seed at once.

    Each seed gets a window of the training framing centred on its disc (1.5 times larger while
    the disc touches its window's edge: its size is then underestimated) and the same window
    shifted (`_shifted`). The refined candidate is the disc in the centred window; its
    anchoring is 1 - the mean distance the disc moved in the shifted windows over the shift: a
    real disc stays where it is in the photograph (1), a made-up one moves with the window (0).
    Its score is multiplied by the anchoring.

    Returns:
      (checked candidates, seeds whose centred window shows no disc dropped; windows predicted).
    """
    n_shift = 2 if diagonal else 4
    centred = [
        Box.around(*c.centre, (c.diameter / framing) * (1.5 if c.touches_edge else 1.0))
        for c in seeds
    ]
    boxes = []
    for b in centred:
        boxes += [b] + _shifted(b, shift, diagonal)
    probs, uncs = predict_boxes(photo, boxes, predict_fn, input_size, batch_size)
    out = []
    step = 1 + n_shift
    for i, c in enumerate(seeds):
        # At the training framing the disc should come out at the framing: a tight size term.
        k = step * i
        r = _measure(probs[k], uncs[k], boxes[k], framing, 1.35)
        if r is None:
            continue
        moved = []
        for j in range(k + 1, k + step):
            m = _measure(probs[j], uncs[j], boxes[j], framing, 1.35)
            offset = math.dist(boxes[j].centre, boxes[k].centre)
            moved.append(1.0 if m is None else min(1.0, math.dist(m.centre, r.centre) / offset))
        anchoring = float(1.0 - np.mean(moved))
        out.append(
            dataclasses.replace(r, votes=c.votes, anchoring=anchoring, score=r.score * anchoring)
        )
    return out, len(boxes)


def bright_spots(
    photo: np.ndarray, fov: FieldOfView, diameter: float, k: int
) -> list[tuple[float, float]]:
    """The `k` places of the field of view brighter than their surroundings at the scale of a
    disc, brightest first: extra seeds for the search (the optic disc is usually the brightest
    round spot of a fundus photograph, but bright lesions and reflexes are too, so the model
    screens and verifies every seed like its own).

    Args:
      photo: uint8 [H, W, 3].
      fov: its field of view (the coarse grid is used).
      diameter: the expected disc diameter in photograph pixels.
      k: how many.

    Returns:
      [(row, col)] in photograph pixels.
    """
    step = int(fov.scale)
    lum = luminance(photo[::step, ::step])
    field = fov.mask[: lum.shape[0], : lum.shape[1]]
    if k <= 0 or not field.any():
        return []
    d = max(2.0, diameter / step)
    # Outside the field the mean retina, so that its border is not a contrast.
    lum = np.where(field, lum, lum[field].mean())
    contrast = ndimage.gaussian_filter(lum, d / 4) - ndimage.gaussian_filter(lum, 1.5 * d)
    inside = ndimage.binary_erosion(field, iterations=2)
    contrast = np.where(inside, contrast, -np.inf)
    peaks = (contrast == ndimage.maximum_filter(contrast, size=max(3, int(d)))) & inside
    rows, cols = np.nonzero(peaks)
    order = np.argsort(-contrast[rows, cols])[:k]
    return [((rows[i] + 0.5) * step - 0.5, (cols[i] + 0.5) * step - 0.5) for i in order]


def _search(
    photo: np.ndarray,
    fov: FieldOfView,
    predict_fn: PredictFn,
    framing: float,
    input_size: int,
    disc_scales: Sequence[float],
    stride: float,
    screen_k: int,
    n_bright: int,
    top_k: int,
    shift: float,
    batch_size: int,
) -> tuple[list[Candidate], int]:
    """One coarse pass, screening and verification (see `locate_disc`).

    Returns:
      (verified candidates, best first by score, windows predicted).
    """
    boxes = coarse_boxes(photo.shape, fov, framing, disc_scales, stride)
    probs, uncs = predict_boxes(photo, boxes, predict_fn, input_size, batch_size)
    n_windows = len(boxes)
    # Coarse windows are at a guessed scale: a disc of another size than guessed is still a
    # good seed, so the size term is loose here (a factor 2 costs 40 %).
    cands = [_measure(p, u, b, framing, 2.0) for p, u, b in zip(probs, uncs, boxes, strict=True)]
    seeds = _suppress(_vote([c for c in cands if c is not None], 0.25), 1.0, screen_k, "votes")
    # Bright spots as extra seeds, at the pass's middle scale; the screening measures their size.
    diameter = float(np.exp(np.mean(np.log(disc_scales)))) * fov.diameter
    for row, col in bright_spots(photo, fov, diameter, n_bright):
        box = Box.around(row, col, diameter / framing)
        # Kept unless a model seed is at the same place: a seed a little off can be a model
        # candidate cut by its window, refined to the wrong place.
        if all(math.dist((row, col), c.centre) > 0.25 * c.diameter for c in seeds):
            seeds.append(Candidate((row, col), diameter, 0.0, box, framing, 0.0, 1.0, 0.0, False))
    if not seeds:
        return [], n_windows
    # Screening: many seeds, two shifted windows each; then the best few, four each.
    checked, n = _check(photo, seeds, predict_fn, framing, input_size, shift, True, batch_size)
    n_windows += n
    seeds = _suppress(checked, 1.0, top_k)
    if not seeds:
        return [], n_windows
    verified, n = _check(photo, seeds, predict_fn, framing, input_size, shift, False, batch_size)
    n_windows += n
    return sorted(verified, key=lambda c: -c.score), n_windows


def locate_disc(
    photo: np.ndarray,
    predict_fn: PredictFn,
    framing: Framing | float,
    input_size: int,
    *,
    disc_scales: Sequence[float] = (0.16,),
    fallback_scales: Sequence[float] = (0.1, 0.25),
    stride: float = 0.5,
    screen_k: int = 6,
    n_bright: int = 3,
    top_k: int = 3,
    shift: float = 0.2,
    batch_size: int = 32,
    min_confidence: float = 0.15,
    fallback_below: float = 0.3,
    two_candidate_ratio: float = 0.8,
    edge_margin: float = 0.25,
    name: str = "",
) -> Localisation:
    """Finds the optic disc in a whole photograph with the trained model itself.

    1. Coarse pass: windows of the training framing (side = candidate disc diameter / framing)
       on a grid of step `stride` * side over the field of view, for candidate disc diameters
       `disc_scales` (fractions of the field of view's diameter), predicted in batches. Each
       window's largest predicted disc is a candidate, scored by its mean probability,
       (1 - mean uncertainty), its ellipse-likeness, its size against the training framing and
       whether the window cut it off; candidates then vote (`_vote`): the summed scores of the
       windows that see a disc at the same place (within a quarter diameter).
    2. Screening: the `screen_k` candidates with the most votes, more than a disc diameter
       apart, and the `n_bright` brightest spots of the field at the scale of a disc
       (`bright_spots`: the disc is usually the brightest round spot, and the coarse windows,
       which cut it, can miss it) are refined: a window of the training framing centred on the
       predicted disc, at the side its measured diameter implies, predicted with two windows
       shifted diagonally by `shift` of the side. Anchoring (`_check`): a real disc stays
       where it is in the photograph, a made-up one moves with the window; the score is
       multiplied by it. A bright spot where the model sees no disc that stays put scores 0:
       the model decides, the brightness only proposes.
    3. Verification: the `top_k` screened candidates are refined once more, with four shifted
       windows.
    4. When the best verified score is under `fallback_below`, steps 1-3 run again at
       `fallback_scales` (discs much smaller or larger in the field than usual) and the better
       result is kept.

    The best verified candidate gives the centre, the diameter and the crop box (centred on it,
    side = diameter / framing); flags say when it is doubtful.

    The defaults: discs are 0.13-0.22 of the field of view's diameter in the shared photographs
    (two cameras, REFUGE and PAPILA), and windows made for 0.16 see discs of about 0.09-0.25
    (the model saw framings of 0.37-0.95 in training); the fallback covers about 0.06-0.4.

    Args:
      photo: uint8 [H, W, 3].
      predict_fn: the model (see the module's docstring).
      framing: the training framing (`training_framing`).
      input_size: the network input side s.
      disc_scales: candidate disc diameters over the field of view's diameter, first pass.
      fallback_scales: the same for the second pass (empty: none).
      stride: the coarse grid's step over the window side.
      screen_k: model candidates screened (3 windows each).
      n_bright: bright spots screened too (`bright_spots`; 0: the model's candidates only).
      top_k: candidates verified (5 windows each).
      shift: the shifted windows' offset over the side.
      batch_size: most windows per `predict_fn` call (batches are padded to `batch_sizes`).
      min_confidence: below this the best candidate is 'no_disc'.
      fallback_below: below this the fallback pass runs.
      two_candidate_ratio: a second candidate, more than 1.5 diameters away, scoring at least
        this fraction of the best, sets 'two_candidates'.
      edge_margin: the disc's edge closer than this many diameters to the photograph's border
        (or more than a fifth of the disc outside the field of view) sets 'at_edge'.
      name: the image's name, for messages.

    Returns:
      The `Localisation`.

    Raises:
      PhotoError: the photograph fails `check_photo`.
    """
    t0 = time.perf_counter()
    f = _framing_value(framing)
    photo = check_photo(photo, input_size, name)
    fov = field_of_view(photo)
    args = (photo, fov, predict_fn, f, input_size)
    rest = (stride, screen_k, n_bright, top_k, shift, batch_size)
    seeds, n_windows = _search(*args, disc_scales, *rest)
    if fallback_scales and (not seeds or seeds[0].score < fallback_below):
        more, n_more = _search(*args, fallback_scales, *rest)
        n_windows += n_more
        seeds = _suppress(seeds + more, 1.0, top_k)
    seconds = time.perf_counter() - t0
    if not seeds or seeds[0].score < min_confidence:
        if not seeds:
            why = f"the model predicted no disc in any of {n_windows} windows"
        else:
            b = seeds[0]
            why = (
                f"best candidate's confidence {b.score:.2f} is under {min_confidence} "
                f"(disc probability {b.probability:.2f}, uncertainty {b.uncertainty:.2f}, size "
                f"{b.ratio:.2f} of its window against {f:.2f}, anchoring {b.anchoring:.2f})"
            )
        best = seeds[0] if seeds else None
        return Localisation(
            centre=best.centre if best else None,
            diameter=best.diameter if best else None,
            box=Box.around(*best.centre, best.diameter / f) if best else None,
            confidence=best.score if best else 0.0,
            flags={"no_disc": why},
            candidates=tuple(seeds),
            n_windows=n_windows,
            seconds=seconds,
        )
    best = seeds[0]
    flags: dict[str, str] = {}
    for other in seeds[1:]:
        dist = math.dist(best.centre, other.centre) / best.diameter
        if dist > 1.5 and other.score >= two_candidate_ratio * best.score:
            flags["two_candidates"] = (
                f"a second disc-like candidate at ({other.centre[0]:.0f}, {other.centre[1]:.0f}),"
                f" {dist:.1f} disc diameters away, scores {other.score:.2f} against "
                f"{best.score:.2f}"
            )
            break
    h, w = photo.shape[:2]
    row, col = best.centre
    radius = best.diameter / 2
    gaps = {"top": row - radius, "left": col - radius, "bottom": h - 1 - row - radius}
    gaps["right"] = w - 1 - col - radius
    side, gap = min(gaps.items(), key=lambda kv: kv[1])
    if gap < edge_margin * best.diameter:
        flags["at_edge"] = (
            f"the disc's edge is {gap:.0f} px ({gap / best.diameter:.2f} diameters) from the "
            f"photograph's {side} border"
        )
    elif fov.found and fov.fraction_outside(row, col, radius) > 0.2:
        outside = fov.fraction_outside(row, col, radius)
        flags["at_edge"] = f"{outside:.0%} of the disc lies outside the field of view"
    return Localisation(
        centre=best.centre,
        diameter=best.diameter,
        box=Box.around(row, col, best.diameter / f),
        confidence=best.score,
        flags=flags,
        candidates=tuple(seeds),
        n_windows=n_windows,
        seconds=seconds,
    )


def predict_photo(
    photo: np.ndarray,
    box: Box,
    predict_fn: PredictFn,
    input_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The model on the located region, written back onto the photograph's grid.

    Args:
      photo: uint8 [H, W, 3].
      box: the region (`Localisation.box`).
      predict_fn: the model.
      input_size: the network input side.

    Returns:
      (disc probability [H, W], uncertainty [H, W]) float32; 0 outside the box.
    """
    prob, unc = predict_fn(crop_region(photo, box, input_size)[None])
    return (
        paste_back(np.asarray(prob)[0], box, photo.shape),
        paste_back(np.asarray(unc)[0], box, photo.shape),
    )
