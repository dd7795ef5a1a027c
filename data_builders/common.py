"""Helpers shared by the real-data builders: features, file pairing, image reading and checks.

Every check raises `DataError` (or `FileNotFoundError` for a missing folder) with a message that
names the offending file or folder, so that a bad release fails before anything is written and a
failure half way leaves no dataset behind (TFDS writes into an `incomplete.*` folder and renames
it only at the end).
"""

from __future__ import annotations

import dataclasses
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

# Suffixes recognised as 2-D image files, compared case-insensitively.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# zlib level for the PNGs we encode ourselves: level 3 is ~3x faster than PIL's default 6 on
# fundus photographs for ~10% larger files. Files already stored as PNG of the right mode are
# passed through untouched.
PNG_COMPRESS_LEVEL = 3


class DataError(ValueError):
    """An input file breaks the conventions of its release; the message names the file."""


# The stored mask of an example built without labels (a test-only domain whose masks are not
# known): every pixel holds this value, outside every class index of every builder, so that a
# mask that is not there can never pass for "all background". Such a domain is for prediction
# only (`python -m puseg_jax.evaluate`); nothing may score or train on it.
UNLABELLED_MASK_VALUE = 255


def segmentation_features(image_channels: int, native: bool = False) -> tfds.features.FeaturesDict:
    """The feature spec shared by every builder of the project.

    Args:
      image_channels: 3 for colour photographs, 1 for MRI slices.
      native: add `native_mask` and `native_spacing`, for builders whose stored mask is
        resampled from the release's own grid (the prostate NIfTI volumes): the ground truth
        on that grid, which evaluation scores on, and the (row, col, slice) size of its pixels.
        Without them the stored mask is on the native grid.

    Returns:
      The `FeaturesDict` with image, mask (class indices), case and slice bookkeeping, spacing
      of the stored mask's pixels and the domain name.
    """
    features = {
        "image": tfds.features.Image(shape=(None, None, image_channels), dtype=np.uint8),
        "mask": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8),
        "case_id": tfds.features.Text(),
        "slice_index": np.int32,
        "num_slices": np.int32,
        "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
        "spacing_unit": tfds.features.Text(),
        "domain": tfds.features.Text(),
    }
    if native:
        features["native_mask"] = tfds.features.Image(shape=(None, None, 1), dtype=np.uint8)
        features["native_spacing"] = tfds.features.Tensor(shape=(3,), dtype=np.float32)
    return tfds.features.FeaturesDict(features)


def require_dirs(folders: Sequence[Path], instructions: str) -> None:
    """Raises `FileNotFoundError` listing every expected folder and which ones are missing."""
    missing = [f for f in folders if not f.is_dir()]
    if missing:
        raise FileNotFoundError(
            f"Missing {len(missing)} of the expected folders:\n"
            + "".join(f"  {f}{'  <- missing' if f in missing else ''}\n" for f in folders)
            + f"\nHow to get the data:\n{instructions}"
        )


def list_by_stem(folder: Path, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """Maps file stem -> path for the image files of `folder` (not recursive).

    Hidden files (`.DS_Store`, `._name.png` left by macOS archivers) are ignored. Two files with
    the same stem (`a.png` and `a.jpg`) are ambiguous and raise `DataError`.
    """
    suffixes = tuple(s.lower() for s in suffixes)
    by_stem: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if not path.name.lower().endswith(suffixes):
            continue
        stem = path.name[: -len(_matching_suffix(path.name, suffixes))]
        if stem in by_stem:
            raise DataError(f"Two files with the same name stem: {by_stem[stem]} and {path}")
        by_stem[stem] = path
    return by_stem


def _matching_suffix(name: str, suffixes: tuple[str, ...]) -> str:
    lower = name.lower()
    return max((s for s in suffixes if lower.endswith(s)), key=len)


def pair_files(
    images: Mapping[str, Path],
    masks: Mapping[str, Path],
    *,
    skip_unpaired: bool,
    where: str,
) -> list[tuple[str, Path, Path]]:
    """Pairs images with masks by key, sorted by key.

    Args:
      images: key -> image path.
      masks: key -> mask path.
      skip_unpaired: if False, any image without a mask or mask without an image raises
        `DataError` listing them; if True they are skipped with a logged warning.
      where: the folder(s) named in the messages.

    Returns:
      `(key, image_path, mask_path)` for every key present in both.
    """
    only_images = sorted(images.keys() - masks.keys())
    only_masks = sorted(masks.keys() - images.keys())
    if only_images or only_masks:
        message = (
            f"Unpaired files in {where}:\n"
            + "".join(f"  image without mask: {images[k]}\n" for k in only_images)
            + "".join(f"  mask without image: {masks[k]}\n" for k in only_masks)
        )
        if not skip_unpaired:
            raise DataError(
                message + "Restore the missing files, or build with `skip_unpaired=True` "
                "to leave these out (a warning is logged)."
            )
        logging.warning("%sSkipping them (skip_unpaired=True).", message)
    return [(k, images[k], masks[k]) for k in sorted(images.keys() & masks.keys())]


def folder_pairs(
    image_dir: Path, mask_dir: Path, *, skip_unpaired: bool, what: str
) -> list[tuple[str, Path, Path]]:
    """`pair_files` of two folders, refusing a split that ends up with no pair.

    Args:
      image_dir: folder of images.
      mask_dir: folder of masks, paired with the images by file stem.
      skip_unpaired: see `pair_files`.
      what: the split and domain named in the error, e.g. "train split of domain Domain1".

    Returns:
      `(stem, image_path, mask_path)`, sorted by stem; never empty.
    """
    pairs = pair_files(
        list_by_stem(image_dir),
        list_by_stem(mask_dir),
        skip_unpaired=skip_unpaired,
        where=f"{image_dir} and {mask_dir}",
    )
    if not pairs:
        raise DataError(f"No image/mask pairs in {image_dir} and {mask_dir}: empty {what}.")
    return pairs


def folder_images(image_dir: Path, *, what: str) -> list[tuple[str, Path, None]]:
    """The images of a folder without masks (an unlabelled split), sorted by stem.

    Args:
      image_dir: folder of images.
      what: the split and domain named in the error.

    Returns:
      `(stem, image_path, None)` per image, in the shape of `folder_pairs`' output; never empty.
    """
    images = list_by_stem(image_dir)
    if not images:
        raise DataError(f"No images in {image_dir}: empty {what}.")
    return [(k, images[k], None) for k in sorted(images)]


def unlabelled_mask(shape: tuple[int, ...]) -> np.ndarray:
    """The uint8 mask stored for an example without labels (`UNLABELLED_MASK_VALUE` everywhere)."""
    return np.full(shape, UNLABELLED_MASK_VALUE, np.uint8)


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    """A decoded 8-bit image and, where the file can be stored as is, its PNG bytes."""

    array: np.ndarray  # (H, W, C) uint8
    png_bytes: bytes | None


def read_image(path: Path, channels: int) -> LoadedImage:
    """Reads an 8-bit image file as (H, W, channels) uint8, fully decoded.

    Colour images (channels=3) accept RGB, RGBA and palette files (alpha dropped). Grey images
    (channels=1) accept L, bilevel, and RGB(A) files whose colour channels are all equal.
    A PNG already in the target mode comes back with its bytes, so the builder can store it
    without re-encoding.

    Raises:
      DataError: unreadable or truncated file, wrong bit depth, or colour where grey is expected.
    """
    with _open_image(path) as image:
        mode, fmt = image.mode, image.format
        target = "RGB" if channels == 3 else "L"
        if channels == 3:
            if mode not in ("RGB", "RGBA", "P"):
                raise DataError(f"{path}: expected an 8-bit colour image, got PIL mode {mode!r}")
            array = np.asarray(image.convert("RGB"))
        else:
            array = _grey_array(image, path)
    png_bytes = path.read_bytes() if fmt == "PNG" and mode == target else None
    return LoadedImage(
        array=array.reshape(array.shape[0], array.shape[1], channels), png_bytes=png_bytes
    )


def read_grey(path: Path) -> np.ndarray:
    """Reads an 8-bit grey file (L, bilevel, palette or RGB(A) with equal channels) as (H, W)."""
    with _open_image(path) as image:
        return _grey_array(image, path)


def _open_image(path: Path) -> Image.Image:
    image = None
    try:
        image = Image.open(path)
        image.load()  # Decode now: truncation and corruption surface here, named by file.
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... by format.
        if image is not None:
            image.close()
        raise DataError(f"{path}: unreadable or truncated image file ({e})") from e
    return image


def _grey_array(image: Image.Image, path: Path) -> np.ndarray:
    mode = image.mode
    if mode == "L":
        return np.asarray(image)
    if mode in ("1", "LA"):
        return np.asarray(image.convert("L"))
    if mode in ("P", "RGB", "RGBA"):
        return _equal_channels(image, path)
    raise DataError(f"{path}: expected an 8-bit grey image, got PIL mode {mode!r}")


def _equal_channels(image: Image.Image, path: Path) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB"))
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
        raise DataError(f"{path}: a grey image or mask is expected, but its colour channels differ")
    return rgb[..., 0]


def map_mask_values(
    mask: np.ndarray, value_to_class: Mapping[int, int], path: Path, convention: str
) -> np.ndarray:
    """Maps stored mask values to class indices, refusing any value outside the convention.

    Args:
      mask: (H, W) uint8 mask as stored in the file.
      value_to_class: stored value -> class index.
      path: the mask file, named in the error.
      convention: human description of the convention, e.g. "255 background, 128 rim, 0 cup".

    Returns:
      (H, W) uint8 class indices.
    """
    values = np.unique(mask)
    unexpected = [int(v) for v in values if int(v) not in value_to_class]
    if unexpected:
        raise DataError(
            f"{path}: mask values {unexpected} are outside the convention ({convention}); "
            f"values found: {[int(v) for v in values]}"
        )
    lookup = np.zeros(256, dtype=np.uint8)
    for value, label in value_to_class.items():
        lookup[value] = label
    return lookup[mask]


def check_same_size(
    image: np.ndarray, mask: np.ndarray, image_path: Path | str, mask_path: Path | str
) -> None:
    """Raises `DataError` when image and mask differ in height or width."""
    if image.shape[:2] != mask.shape[:2]:
        raise DataError(
            f"Image and mask sizes differ: {image_path} is {image.shape[0]}x{image.shape[1]}, "
            f"{mask_path} is {mask.shape[0]}x{mask.shape[1]}"
        )


def resize_image(array: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """uint8 [H, W, C] -> [size, size, C]: PIL bilinear (antialiased when shrinking) or nearest
    for label masks. The input pipeline resizes with this same function, so a dataset stored
    at the training size (`store_size`) gives the network the same pixels."""
    if array.shape[0] == size and array.shape[1] == size:
        return array
    resample = Image.NEAREST if nearest else Image.BILINEAR
    if array.shape[-1] == 3:  # PIL resamples the bands of an RGB image independently
        return np.asarray(Image.fromarray(array, "RGB").resize((size, size), resample))
    channels = [
        np.asarray(Image.fromarray(array[..., c], "L").resize((size, size), resample))
        for c in range(array.shape[-1])
    ]
    return np.stack(channels, axis=-1)


def encode_png(array: np.ndarray) -> bytes:
    """Encodes an (H, W), (H, W, 1) or (H, W, 3) uint8 array as PNG bytes."""
    if array.dtype != np.uint8:
        raise TypeError(f"encode_png expects uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def example_key(case_id: str, slice_index: int) -> str:
    """The stable example key `<case>_<slice:03d>`."""
    return f"{case_id}_{slice_index:03d}"


_CONFIG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_config_name(name: str) -> None:
    """Raises `ValueError` for a config name TFDS cannot use as a folder name."""
    if not _CONFIG_NAME.match(name):
        raise ValueError(
            f"Config name {name!r} must start with a letter or digit and contain only letters, "
            "digits, '_', '.' and '-'."
        )
