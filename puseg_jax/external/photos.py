"""Whole fundus photographs in, disc and cup out: framing, crop, paste back (issue 22).

Every fundus model of this repository is trained on regions of interest around the optic disc
(the DoFE layout): the disc fills a large, fairly constant fraction of the region. A clinic has
whole photographs, where the disc is a small spot anywhere in the field of view; resizing such a
photograph to the network's input shrinks the disc to a few pixels. This module turns a
photograph into the region the model was trained on and the region's prediction back into the
photograph's grid (`localise.locate_disc` finds where):

* `is_photograph`: whole photograph or disc-centred region, decided per image from the dark
  border around a photograph's circular field of view (and, when given a model, from how large
  the model sees the disc in the whole image).
* `training_framing`: the disc's diameter relative to the region's side, as in the run's own
  training masks (passed in as arrays; never a typed constant).
* `crop_region` / `paste_back` / `predict_boxes` / `predict_photo`: the crop (padded with black
  where the box leaves the image, as outside a photograph's field of view), the model on
  windows, and the bilinear write-back of the region's probabilities and uncertainty onto the
  photograph's grid (zero outside the box), so that predictions, masks and scores live on the
  photograph's own grid.

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
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from puseg_jax.core import resample
from puseg_jax.external.photo_checks import (
    FieldOfView,
    dark_corners,
    disc_of,
    equivalent_diameter,
    largest_component,
)

# A predict function: uint8 [N, s, s, 3] regions -> (disc probability, uncertainty), [N, s, s].
PredictFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

# Disc probability above which a pixel is disc (the eval default `eval.threshold`).
DISC_THRESHOLD = 0.5

# All four corners are dark in every shared photograph; no DoFE region has more than two
# (Domain3's regions near the field-of-view edge have one or two).
PHOTO_DARK_CORNERS = 3
# With a model: a disc seen (whole image resized to the input) smaller than this fraction of the
# training framing means the image shows much more than a region (a photograph without border).
PHOTO_DISC_RATIO = 0.35

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


def framing_value(framing: Framing | float) -> float:
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
    disc = largest_component(np.asarray(prob[0]) > DISC_THRESHOLD)
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
    f = framing_value(framing)
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
# The model on windows.


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
