"""Reading and checking fundus photographs and their masks, and the field of view (issue 22).

* `read_photo` / `read_mask` / `check_photo` / `check_mask`: the per-image checks (an unreadable
  file, a grey or constant image, an image smaller than the network input, a mask of another
  size or with other values than 0/128/255) raise `PhotoError`, whose `kind` and message a
  command line prints before going on with the other images.
* `field_of_view` / `dark_corners`: the bright disc of retina on a photograph's black surround.
* `disc_of` / `equivalent_diameter` / `largest_component`: the disc of a mask and its size, used
  for the training framing and every measured disc alike.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

# The release's mask convention (0 cup, 128 disc rim, 255 background) and the TFDS class indices
# the fundus builder stores (0 background, 1 rim, 2 cup).
MASK_VALUES = (0, 128, 255)
CONVENTIONS = ("release", "classes")

# A pixel is "dark" (outside the field of view) below max(DARK_MIN, DARK_FRACTION * the image's
# 90th luminance percentile): photographs have a black surround (0-5 levels) while even the
# darkest retina in the shared photographs (PAPILA, 90th percentile ~50) stays above 8.
DARK_MIN = 8.0
DARK_FRACTION = 0.08
# Corner patches of this fraction of the short side; a corner is dark when more than half its
# pixels are.
CORNER_FRACTION = 0.08

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


def release_to_classes(mask: np.ndarray) -> np.ndarray:
    """A checked release mask (0 cup, 128 rim, 255 background) -> class indices (0 background,
    1 rim, 2 cup), as the fundus builder stores them."""
    lookup = np.zeros(256, np.uint8)
    lookup[0], lookup[128] = 2, 1
    return lookup[np.asarray(mask, np.uint8)]


def equivalent_diameter(area: float) -> float:
    """The diameter of the circle of this area: 2 sqrt(area / pi). Used for every disc size
    here (training masks, predictions), so that the framing and the measurements agree."""
    return 2.0 * math.sqrt(max(float(area), 0.0) / math.pi)


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))


# ---------------------------------------------------------------------------------------------
# Field of view.


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

    def coverage(self, box) -> float:
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
