"""Per-example transforms: resizing, joint random affine augmentation, intensity changes,
normalisation and the network's input size."""

import math
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from data_builders.common import resize_image

# ---------------------------------------------------------------------------------------------
# Per-example transforms (NumPy and PIL, run in grain's threads or workers).


def _pil_apply(x: np.ndarray, fn) -> np.ndarray:
    """Applies a PIL image operation to a uint8 [H, W, C] array: 3 channels in one RGB image
    (PIL processes them independently), any other count one grey image per channel."""
    if x.shape[-1] == 3:
        return np.asarray(fn(Image.fromarray(x, "RGB")))
    return np.stack(
        [np.asarray(fn(Image.fromarray(x[..., c], "L"))) for c in range(x.shape[-1])], -1
    )


def resize(x: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """uint8 [H, W, C] -> [size, size, C]: antialiased bilinear for images, nearest for masks
    (the builders' `resize_image`, so stored and on-the-fly resizing agree)."""
    return resize_image(x, size, nearest)


def random_affine(rng: np.random.Generator, aug: ml_collections.ConfigDict, size: int):
    """Random scale, rotation, horizontal flip and shift (the crop's position).

    Returns:
      (A, t): the output -> input map `in = A @ (out - c) + c + t` in PIL's (x, y) pixel
      coordinates (x along columns, pixel centres at +0.5, c the image centre).
    """
    scale = rng.uniform(*aug.scale)
    angle = np.deg2rad(rng.uniform(-aug.rotate_deg, aug.rotate_deg))
    flip = aug.flip and rng.random() < 0.5
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    matrix = np.array([[cos, -sin], [sin, cos]])
    if flip:
        matrix = matrix @ np.diag([-1.0, 1.0])
    shift = rng.uniform(-aug.translate, aug.translate, size=2) * size
    return matrix, shift


def warp(x: np.ndarray, matrix: np.ndarray, shift: np.ndarray, nearest: bool) -> np.ndarray:
    """Applies `random_affine`'s map to a uint8 [S, S, C] array, outside pixels reflected.

    The array is reflect-padded by just the margin the map reaches beyond it, then resampled by
    PIL (bilinear for images, nearest for masks: label values stay in the label set).
    """
    size = x.shape[0]
    centre = np.full(2, size / 2.0)
    corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64)
    reach = (corners - centre) @ matrix.T + centre + shift
    margin = int(math.ceil(max(0.0, -reach.min(), reach.max() - size))) + 1
    padded = np.pad(x, ((margin, margin), (margin, margin), (0, 0)), mode="reflect")
    offset = centre + shift - matrix @ centre + margin
    data = (matrix[0, 0], matrix[0, 1], offset[0], matrix[1, 0], matrix[1, 1], offset[1])
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return _pil_apply(
        padded, lambda im: im.transform((size, size), Image.AFFINE, data, resample=resample)
    )


def intensity(image: np.ndarray, rng: np.random.Generator, aug: ml_collections.ConfigDict):
    """Gamma, contrast, brightness and noise on an image (never on the mask).

    Args:
      image: uint8 [H, W, C], or float [H, W, C] in [0, 1].
      rng: the example's generator.
      aug: config.augment (gamma: log-gamma range; contrast: +- gain about the mean;
        brightness: +- additive; noise_std: maximum Gaussian noise std), on [0, 1] intensities.

    Returns:
      The augmented float32 image on the [0, 1] scale (not clipped: noise may leave it).
    """
    gamma = np.float32(np.exp(rng.uniform(-aug.gamma, aug.gamma)))
    if image.dtype == np.uint8:
        # A 256-entry table instead of a power per pixel (the bulk of the cost otherwise).
        image = ((np.arange(256, dtype=np.float32) / 255) ** gamma)[image]
    else:
        image = np.clip(image, 0.0, 1.0).astype(np.float32) ** gamma
    # Contrast about the mean and brightness as one affine map: image * gain + offset.
    gain = 1.0 + rng.uniform(-aug.contrast, aug.contrast)
    offset = image.mean() * (1.0 - gain) + rng.uniform(-aug.brightness, aug.brightness)
    image *= np.float32(gain)
    image += np.float32(offset)
    if aug.noise_std > 0:
        image += np.float32(rng.uniform(0, aug.noise_std)) * rng.standard_normal(
            image.shape, np.float32
        )
    return image


def normalization_stats(image: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) per channel of the per-image normalisation, on the [0, 1] scale.

    Args:
      image: uint8 [H, W, C] (statistics from per-channel histograms: exact and ~5x faster than
        reductions over strided float channels), or float [H, W, C] in [0, 1].
      mode: 'zscore' (mean and standard deviation per channel) or 'unit' (0 and 1).

    Returns:
      float32 (shift, scale), each [C].
    """
    channels = image.shape[-1]
    if mode == "unit":
        return np.zeros(channels, np.float32), np.ones(channels, np.float32)
    if mode != "zscore":
        raise ValueError(f"Unknown normalisation {mode!r}")
    flat = image.reshape(-1, channels)
    if image.dtype == np.uint8:
        hist = np.stack([np.bincount(flat[:, c], minlength=256) for c in range(channels)])
        values = np.arange(256) / 255.0
        mean = hist @ values / len(flat)
        var = np.maximum(hist @ values**2 / len(flat) - mean**2, 0.0)
    else:
        mean = flat.mean(axis=0, dtype=np.float64)
        var = np.mean((flat - mean) ** 2, axis=0)
    return mean.astype(np.float32), np.maximum(np.sqrt(var), 1e-6).astype(np.float32)


def to_input_size(ex: dict[str, Any], size: int) -> dict[str, Any]:
    """An example with image and mask resized to [size, size] (uint8) and the spacing of one
    network pixel. `spacing` is that of one stored mask pixel, and a network pixel spans
    mask_size / size of them, so distances on the network's grid come out in the stored unit
    (mm, or pixels of the released image). The image may be stored smaller than the mask (the
    fundus builder's `store_size`); each is resized from its own size."""
    image, mask = ex["image"], ex["mask"]
    if image.shape[:2] == mask.shape[:2] == (size, size):
        return ex
    spacing = np.asarray(ex["spacing"], np.float32).copy()
    spacing[:2] *= np.asarray(mask.shape[:2], np.float32) / size
    return dict(
        ex,
        image=resize(image, size, nearest=False),
        mask=resize(mask, size, nearest=True),
        spacing=spacing,
    )


def preprocess(
    ex: dict[str, Any],
    config: ml_collections.ConfigDict,
    rng: np.random.Generator | None,
) -> dict[str, np.ndarray]:
    """Resizes (and, given `rng`, augments) one example to the network's input.

    Args:
      ex: an `ExampleReader` example (or one already passed through `to_input_size`).
      config: the experiment config (data.image_size, data.normalize, augment.*).
      rng: the example's generator; None for evaluation (no augmentation).

    Returns:
      {'image': float32 [S, S, C] normalised, 'mask': int32 [S, S] class indices,
      'spacing': float32 (row, col, slice) size of one network pixel}. Geometric augmentation
      moves image and mask together; intensity augmentation touches the image only.
    """
    ex = to_input_size(ex, config.data.image_size)
    image, mask = ex["image"], ex["mask"]
    augment = rng is not None and config.augment.enabled
    if augment:
        matrix, shift = random_affine(rng, config.augment, config.data.image_size)
        image = warp(image, matrix, shift, nearest=False)
        mask = warp(mask, matrix, shift, nearest=True)
    # Statistics of the image before intensity augmentation: per-image z-scoring after it
    # would undo brightness and contrast exactly (both are affine per channel).
    shift, scale = normalization_stats(image, config.data.normalize)
    if augment:
        image = intensity(image, rng, config.augment)
    else:
        image = image.astype(np.float32) * np.float32(1 / 255)
    image -= shift
    image /= scale
    return {
        "image": image,
        "mask": mask[..., 0].astype(np.int32),
        "spacing": np.asarray(ex["spacing"], np.float32),
    }
