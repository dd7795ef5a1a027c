"""Prostate gland segmentation in T2-weighted MRI from six sites, 3-D NIfTI or 2-D slice layout."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from data_builders import common

_DESCRIPTION = """\
Axial T2-weighted prostate MRI slices with whole-gland masks (0 background, 1 prostate) from the
six sites of the SAML multi-site collection. The `nifti` layout turns every slice of every volume
into an example (intensities clipped to the [0.5, 99.5] percentiles of the volume, scaled to
[0, 255] uint8, resized in-plane to 384x384) with the spacing of the stored grid in mm, and keeps
the slice's label on the volume's own grid (`native_mask`, with its spacing `native_spacing`),
which evaluation scores on; the `slices` layout stores the released 384x384 PNG slices as they
are, spacing unknown.
"""

_CITATION = """\
@inproceedings{liu2020saml,
  title={Shape-aware Meta-learning for Generalizing Prostate {MRI} Segmentation to Unseen
         Domains},
  author={Liu, Quande and Dou, Qi and Heng, Pheng-Ann},
  booktitle={Medical Image Computing and Computer Assisted Intervention (MICCAI)},
  pages={475--485}, year={2020}
}
"""

_INSTRUCTIONS = """\
NIfTI layout (configs RUNMC, BMC, I2CVB, UCL, BIDMC, HK): download the multi-site prostate data
linked from the SAML project page (https://liuquande.github.io/SAML/) and extract it so that

  <manual_dir>/<SITE>/Case00.nii.gz
  <manual_dir>/<SITE>/Case00_segmentation.nii.gz     (or Case00_Segmentation.nii.gz)

Slice layout (configs <SITE>_slices): the ProstateSlice release of 384x384 PNG slices of the same
sites, extracted so that

  <manual_dir>/<SITE>/{train,test}/{image,mask}/<case>_<slice>.png

SITE is one of RUNMC, BMC, I2CVB, UCL, BIDMC, HK (or your own site folder, see `prostate_builder`
and docs/data.md). Masks: 0 background, 1 prostate (NIfTI); 255 background, 0 prostate (PNG,
as in the ProstateSlice release: the gland is the small dark region; pass
`slice_foreground_value=255` for PNG masks drawn the other way round).
"""

SITE_SOURCES = {
    "RUNMC": "Radboud University Nijmegen Medical Centre, from NCI-ISBI 2013",
    "BMC": "Boston Medical Center, from NCI-ISBI 2013",
    "I2CVB": "Hospital Center Regional University of Dijon, from I2CVB",
    "UCL": "University College London, from PROMISE12",
    "BIDMC": "Beth Israel Deaconess Medical Center, from PROMISE12",
    "HK": "Haukeland University Hospital, from PROMISE12",
}

LAYOUTS = ("nifti", "slices")

# In-plane size of the stored slices (that of the ProstateSlice release).
DEFAULT_SIZE = 384

# Intensity window of each volume, in percentiles of its voxels.
CLIP_PERCENTILES = (0.5, 99.5)

# Sorted cases at positions 5, 10, 15, ... (counting from 1) form the validation split.
VALIDATION_EVERY = 5

# Image and label affines may differ by float noise written by the tools that saved them.
AFFINE_ATOL = 1e-3

# ProstateSlice PNG masks: 255 background, 0 prostate (checked on every site of the release:
# the 0-valued region is one compact blob covering 0.3-4% of the slice, on the gland).
SLICE_FOREGROUND_VALUE = 0

# Whole-gland masks never cover most of an axial pelvic slice: a split whose masks do is almost
# certainly read with the wrong foreground value, and building it would train on the inverse.
MAX_GLAND_FRACTION = 0.5


def slice_mask_convention(foreground_value: int) -> tuple[dict[int, int], str]:
    """(stored value -> class, description) of two-valued PNG masks with this gland value."""
    if foreground_value not in (0, 255):
        raise ValueError(f"slice_foreground_value must be 0 or 255, got {foreground_value}")
    background = 255 - foreground_value
    return (
        {background: 0, foreground_value: 1},
        f"{background} background, {foreground_value} prostate",
    )


_NIFTI_IMAGE = re.compile(r"^(?P<case>.+?)\.nii(\.gz)?$")
_NIFTI_LABEL = re.compile(r"^(?P<case>.+?)_segmentation\.nii(\.gz)?$", re.IGNORECASE)
_SLICE_NAME = re.compile(r"^(?P<case>.+)_(?P<slice>\d+)$")


@dataclasses.dataclass(eq=False)
class ProstateConfig(tfds.core.BuilderConfig):
    """One prostate site in one release layout.

    Attributes:
      site: folder under `manual_dir` holding the site's files.
      layout: "nifti" (SAML volumes, split 80/20 by patient into train/validation) or "slices"
        (ProstateSlice PNGs, train/test as released).
      size: in-plane side of the stored slices of the nifti layout.
      splits: None for the layout's splits (above); one split name, e.g. `("test",)`, for a
        test-only site (a hospital the model never trained on): nifti puts every case in it,
        slices reads only that folder.
      labels: False builds volumes (nifti: every `<case>.nii[.gz]`, any label file ignored) or
        slices (the `image` folders) without masks, a site to predict and never to score: every
        stored mask holds `common.UNLABELLED_MASK_VALUE`.
    """

    site: str = ""
    layout: str = "nifti"
    size: int = DEFAULT_SIZE
    splits: tuple[str, ...] | None = None
    labels: bool = True

    def check(self) -> None:
        """Raises `ValueError` for fields that contradict each other."""
        common.check_config_name(self.name)
        if self.layout not in LAYOUTS:
            raise ValueError(f"Config {self.name}: layout must be one of {LAYOUTS}")
        if self.splits is not None and len(self.splits) != 1:
            raise ValueError(
                f"Config {self.name}: splits must be None (the layout's own) or one split name, "
                f"got {self.splits}"
            )


def _registered_configs() -> list[ProstateConfig]:
    configs = []
    for site, source in SITE_SOURCES.items():
        configs.append(
            ProstateConfig(
                name=site,
                site=site,
                layout="nifti",
                description=f"{site} ({source}): SAML NIfTI volumes, every axial slice, "
                f"resized to {DEFAULT_SIZE}x{DEFAULT_SIZE}, patient split train/validation.",
            )
        )
        configs.append(
            ProstateConfig(
                name=f"{site}_slices",
                site=site,
                layout="slices",
                description=f"{site} ({source}): ProstateSlice 384x384 PNG slices, "
                "train/test as released.",
            )
        )
    return configs


class Prostate(tfds.core.GeneratorBasedBuilder):
    """DatasetBuilder for the six-site prostate MRI collection (one config per site and layout)."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Slices layout: the PNG masks' 0 is the prostate (1.0.0 took 255, inverting "
        "every ProstateSlice mask); inverted-looking masks are refused.",
        "1.2.0": "NIfTI layout: each slice also keeps its label on the volume's own in-plane "
        "grid (native_mask) and that grid's spacing in mm (native_spacing), to score at the "
        "original resolution. Slices layout and stored images unchanged.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
    BUILDER_CONFIGS = _registered_configs()

    def __init__(
        self,
        *,
        skip_unpaired: bool = False,
        merge_labels: bool = False,
        slice_foreground_value: int = SLICE_FOREGROUND_VALUE,
        **kwargs: Any,
    ):
        """Builder for one site and layout.

        Args:
          skip_unpaired: skip (with a warning) images without a mask and masks without an image
            instead of failing.
          merge_labels: nifti layout only: accept labels with several positive values (zonal
            labels such as 1 central gland, 2 peripheral zone) and merge them into the gland.
            Without it any label value other than 0 and 1 is an error.
          slice_foreground_value: slices layout only: the PNG mask value of the prostate (0 in
            the ProstateSlice release, whose background is 255); the other value of {0, 255} is
            background. A split whose masks mark more than half of all pixels as prostate is
            refused as inverted.
          **kwargs: `data_dir`, `config` (a name or a `ProstateConfig`), `version`.
        """
        super().__init__(**kwargs)
        self._skip_unpaired = skip_unpaired
        self._merge_labels = merge_labels
        slice_mask_convention(slice_foreground_value)  # validates the value
        self._slice_foreground_value = slice_foreground_value
        # Kept when pickled.
        self._original_state.update(
            skip_unpaired=skip_unpaired,
            merge_labels=merge_labels,
            slice_foreground_value=slice_foreground_value,
        )

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=common.segmentation_features(
                image_channels=1, native=self.builder_config.layout == "nifti"
            ),
            supervised_keys=("image", "mask"),
            citation=_CITATION,
            # Examples are stored in (case, slice) order; shuffling belongs to the input pipeline.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        config = self.builder_config
        config.check()
        root = Path(dl_manager.manual_dir) / config.site
        if config.layout == "nifti":
            return self._nifti_splits(root)
        return self._slice_splits(root)

    def _generate_examples(
        self, pairs: list[tuple[str, Path, Path | None]]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        if self.builder_config.layout == "nifti":
            yield from self._nifti_examples(pairs)
        else:
            yield from self._slice_examples(pairs)

    # ---------------------------------------------------------------- NIfTI layout (SAML)

    def _nifti_splits(self, root: Path) -> dict[str, Iterator]:
        common.require_dirs([root], _INSTRUCTIONS)
        config = self.builder_config
        images, labels = list_nifti_files(root)
        if not config.labels:
            pairs = [(case, images[case], None) for case in sorted(images)]
            if not pairs:
                raise common.DataError(
                    f"No <case>.nii.gz volumes in {root}: empty site {config.site}."
                )
        else:
            pairs = common.pair_files(
                images, labels, skip_unpaired=self._skip_unpaired, where=str(root)
            )
            if not pairs:
                raise common.DataError(
                    f"No <case>.nii.gz / <case>_segmentation.nii.gz pairs in {root}: empty site "
                    f"{config.site}."
                )
        if config.splits is not None:  # a test-only site: every case in its one split
            return {config.splits[0]: self._generate_examples(pairs)}
        by_case = {case: (case, image, label) for case, image, label in pairs}
        train, validation = split_cases(list(by_case))
        splits = {"train": self._generate_examples([by_case[c] for c in train])}
        if validation:
            splits["validation"] = self._generate_examples([by_case[c] for c in validation])
        else:
            logging.warning("%s has a single case: no validation split.", root)
        return splits

    def _nifti_examples(
        self, pairs: list[tuple[str, Path, Path | None]]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        size = self.builder_config.size
        for case, image_path, label_path in pairs:
            if label_path is None:
                volume, zooms = load_nifti_image(image_path)
                labels = None
            else:
                volume, labels, zooms = load_nifti_pair(image_path, label_path)
                labels = binarize_labels(labels, label_path, merge_labels=self._merge_labels)
            scaled = normalize_intensity(volume)
            rows, cols, num_slices = volume.shape
            spacing = np.array(
                [zooms[0] * rows / size, zooms[1] * cols / size, zooms[2]], dtype=np.float32
            )
            native_spacing = np.asarray(zooms, dtype=np.float32)
            for k in range(num_slices):
                image = resize_slice(scaled[:, :, k], size, Image.Resampling.BILINEAR)
                if labels is None:
                    mask = common.unlabelled_mask((size, size))
                    native_mask = common.unlabelled_mask((rows, cols))
                else:
                    mask = resize_slice(labels[:, :, k], size, Image.Resampling.NEAREST)
                    native_mask = labels[:, :, k].astype(np.uint8)
                yield (
                    common.example_key(case, k),
                    {
                        "image": common.encode_png(quantize(image)),
                        "mask": common.encode_png(mask.astype(np.uint8)),
                        "case_id": case,
                        "slice_index": k,
                        "num_slices": num_slices,
                        "spacing": spacing,
                        "spacing_unit": "mm",
                        "domain": self.builder_config.name,
                        # The slice on the volume's own grid (display orientation, as `image`).
                        "native_mask": common.encode_png(native_mask),
                        "native_spacing": native_spacing,
                    },
                )

    # ---------------------------------------------------------------- slice layout (PNG)

    def _slice_splits(self, root: Path) -> dict[str, Iterator]:
        config = self.builder_config
        names = config.splits or ("train", "test")
        kinds = ("image", "mask") if config.labels else ("image",)
        common.require_dirs([root / s / kind for s in names for kind in kinds], _INSTRUCTIONS)
        splits = {}
        for split in names:
            image_dir, mask_dir = root / split / "image", root / split / "mask"
            what = f"{split} split of site {config.site}"
            if not config.labels:
                pairs = common.folder_images(image_dir, what=what)
            else:
                pairs = common.folder_pairs(
                    image_dir, mask_dir, skip_unpaired=self._skip_unpaired, what=what
                )
            splits[split] = self._generate_examples(pairs)
        return splits

    def _slice_examples(
        self, pairs: list[tuple[str, Path, Path]]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        parsed = sorted(
            (parse_slice_name(name, image_path), image_path, mask_path)
            for name, image_path, mask_path in pairs
        )
        seen: dict[tuple[str, int], Path] = {}
        for key, image_path, _ in parsed:
            if key in seen:
                raise common.DataError(
                    f"Two files for case {key[0]} slice {key[1]}: {seen[key]} and {image_path}"
                )
            seen[key] = image_path
        num_slices = Counter(case for (case, _), _, _ in parsed)
        value_to_class, convention = slice_mask_convention(self._slice_foreground_value)
        gland_pixels = total_pixels = 0
        for (case, index), image_path, mask_path in parsed:
            image = common.read_image(image_path, channels=1)
            if mask_path is None:
                mask = common.unlabelled_mask(image.array.shape[:2])
            else:
                stored = common.read_grey(mask_path)
                common.check_same_size(image.array, stored, image_path, mask_path)
                mask = common.map_mask_values(stored, value_to_class, mask_path, convention)
                gland_pixels += int(mask.sum())
                total_pixels += mask.size
            yield (
                common.example_key(case, index),
                {
                    "image": image.png_bytes or common.encode_png(image.array),
                    "mask": common.encode_png(mask),
                    "case_id": case,
                    "slice_index": index,
                    "num_slices": num_slices[case],
                    # The release keeps no header: physical spacing is unknown.
                    "spacing": np.ones(3, dtype=np.float32),
                    "spacing_unit": "pixel",
                    "domain": self.builder_config.name,
                },
            )
        if total_pixels and gland_pixels > MAX_GLAND_FRACTION * total_pixels:
            raise common.DataError(
                f"Site {self.builder_config.site}: the masks mark "
                f"{gland_pixels / total_pixels:.0%} of all pixels as prostate under the "
                f"convention '{convention}'; a whole-gland mask covers a few percent of an axial "
                f"slice, so the masks are most likely drawn the other way round: pass "
                f"slice_foreground_value={255 - self._slice_foreground_value}."
            )


# -------------------------------------------------------------------- pure helpers


def split_cases(case_ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """Deterministic 80/20 patient split of one site.

    Sorted cases at positions 5, 10, 15, ... (counting from 1) go to validation, so RUNMC's 30
    cases give 24/6 and HK's 12 give 10/2. A site of 2 to 4 cases puts its last case in
    validation; a single case stays in train alone.

    Returns:
      (train case ids, validation case ids), both sorted.
    """
    ordered = sorted(case_ids)
    validation = [c for i, c in enumerate(ordered, start=1) if i % VALIDATION_EVERY == 0]
    if not validation and len(ordered) >= 2:
        validation = ordered[-1:]
    train = [c for c in ordered if c not in set(validation)]
    return train, validation


def list_nifti_files(root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """The volumes of a site folder by case, SAML naming (not recursive, hidden files ignored).

    Returns:
      ({case: `<case>.nii[.gz]`}, {case: `<case>_segmentation.nii[.gz]`}); two files of one
      case and kind (`a.nii` and `a.nii.gz`) raise `DataError`.
    """
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if match := _NIFTI_LABEL.match(path.name):
            target = labels
        elif match := _NIFTI_IMAGE.match(path.name):
            target = images
        else:
            continue
        case = match["case"]
        if case in target:
            raise common.DataError(f"Two files for case {case}: {target[case]} and {path}")
        target[case] = path
    return images, labels


def load_nifti_image(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """An image volume alone, in the orientation of `load_nifti_pair`.

    Returns:
      (image float32 of shape (rows, cols, slices), (row, col, slice) voxel size in mm).
    """
    image = nib.as_closest_canonical(_load_nifti(path))
    volume = _read_voxels(image, path, np.float32)
    zx, zy, zz = (float(z) for z in image.header.get_zooms()[:3])
    return _to_display(volume), (zy, zx, zz)


def load_nifti_pair(
    image_path: Path, label_path: Path
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Loads an image volume and its label volume in a common orientation.

    Both are checked for matching shape and affine in the files, reoriented to the closest
    canonical (RAS+) axes, then laid out as (row, col, slice) = (anterior->posterior,
    right->left, inferior->superior): axial slices as radiologists view them.

    Returns:
      (image float32, label, (row, col, slice) voxel size in mm), arrays of shape
      (rows, cols, slices).
    """
    image = _load_nifti(image_path)
    label = _load_nifti(label_path)
    if image.shape != label.shape:
        raise common.DataError(
            f"Image and label shapes differ: {image_path} is {image.shape}, "
            f"{label_path} is {label.shape}"
        )
    if not np.allclose(image.affine, label.affine, atol=AFFINE_ATOL):
        raise common.DataError(
            f"Image and label affines differ (atol {AFFINE_ATOL}): {image_path} has\n"
            f"{np.array2string(image.affine, precision=4)}\n{label_path} has\n"
            f"{np.array2string(label.affine, precision=4)}"
        )
    image = nib.as_closest_canonical(image)
    label = nib.as_closest_canonical(label)
    volume = _read_voxels(image, image_path, np.float32)
    labels = _read_voxels(label, label_path, None)
    zx, zy, zz = (float(z) for z in image.header.get_zooms()[:3])
    return _to_display(volume), _to_display(labels), (zy, zx, zz)


def _load_nifti(path: Path) -> nib.Nifti1Image:
    try:
        image = nib.load(path)
    except Exception as e:  # nibabel raises ImageFileError, OSError, EOFError, ...
        raise common.DataError(f"{path}: unreadable NIfTI file ({e})") from e
    shape = image.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise common.DataError(f"{path}: expected a 3-D volume, got shape {image.shape}")
    if shape != image.shape:
        image = nib.Nifti1Image(
            np.asarray(image.dataobj).reshape(shape), image.affine, image.header
        )
    return image


def _read_voxels(image: nib.Nifti1Image, path: Path, dtype: type | None) -> np.ndarray:
    try:
        data = np.asarray(image.dataobj) if dtype is None else image.get_fdata(dtype=dtype)
    except Exception as e:  # gzip/zlib errors of a truncated file surface only here.
        raise common.DataError(f"{path}: unreadable or truncated NIfTI data ({e})") from e
    if not np.all(np.isfinite(data)):
        raise common.DataError(f"{path}: volume contains NaN or infinite values")
    return data


def _to_display(volume: np.ndarray) -> np.ndarray:
    # RAS+ (x: ->right, y: ->anterior) to rows anterior->posterior, cols right->left.
    return np.ascontiguousarray(np.flip(volume, axis=(0, 1)).transpose(1, 0, 2))


def display_to_file(volume: np.ndarray, image: nib.Nifti1Image) -> np.ndarray:
    """Undoes `load_nifti_pair`'s orientation: an array in the builder's (row, col, slice)
    layout of `image` (e.g. a prediction resampled to the native grid) back in the voxel order
    of the file, so it can be saved with the file's own affine and shape.

    Args:
      volume: (rows, cols, slices, ...) as `load_nifti_pair` returns the image's voxels.
      image: the NIfTI image (file) the volume belongs to.

    Returns:
      The array in the file's voxel axes, of the file's 3-D shape (trailing axes kept).
    """
    shape = image.shape[:3]
    ras = np.flip(np.swapaxes(volume, 0, 1), axis=(0, 1))  # inverse of _to_display
    to_file = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), nib.orientations.io_orientation(image.affine)
    )
    out = nib.orientations.apply_orientation(ras, to_file)
    if out.shape[:3] != tuple(shape):
        raise ValueError(
            f"A volume of display shape {volume.shape[:3]} does not belong to a file of shape "
            f"{tuple(shape)}"
        )
    return np.ascontiguousarray(out)


def binarize_labels(labels: np.ndarray, path: Path, *, merge_labels: bool) -> np.ndarray:
    """Returns a uint8 0/1 gland mask, refusing label values outside {0, 1}.

    With `merge_labels`, every positive integer value (zones of the gland) becomes 1.
    """
    unexpected = [v.item() for v in np.unique(labels) if v != 0 and v != 1]
    if unexpected:
        integral_positive = all(float(v) > 0 and float(v).is_integer() for v in unexpected)
        if not (merge_labels and integral_positive):
            hint = (
                " Build with merge_labels=True to merge positive zonal labels into the gland."
                if integral_positive
                else ""
            )
            raise common.DataError(
                f"{path}: label values {unexpected[:10]} outside {{0, 1}} "
                f"(0 background, 1 prostate).{hint}"
            )
    return (labels > 0).astype(np.uint8)


def normalize_intensity(volume: np.ndarray) -> np.ndarray:
    """Clips a volume to its [0.5, 99.5] percentiles and scales it to [0, 1] (float32).

    A constant volume becomes all zeros.
    """
    low, high = np.percentile(volume, CLIP_PERCENTILES)
    if high <= low:
        return np.zeros_like(volume, dtype=np.float32)
    return ((np.clip(volume, low, high) - low) / (high - low)).astype(np.float32)


def resize_slice(plane: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    """Resizes a 2-D plane to size x size (bilinear for [0, 1] floats, nearest for labels)."""
    if plane.shape == (size, size):
        return plane
    if resample == Image.Resampling.NEAREST:
        return np.asarray(Image.fromarray(plane.astype(np.uint8)).resize((size, size), resample))
    resized = Image.fromarray(plane.astype(np.float32)).resize((size, size), resample)
    return np.asarray(resized)


def quantize(plane: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 in [0, 255], rounding to nearest."""
    return np.round(np.clip(plane, 0.0, 1.0) * 255.0).astype(np.uint8)


def parse_slice_name(name: str, path: Path) -> tuple[str, int]:
    """`<case>_<slice>` file stem -> (case id, slice index)."""
    match = _SLICE_NAME.match(name)
    if not match:
        raise common.DataError(f"{path}: file name is not <case>_<slice>.png")
    return match["case"], int(match["slice"])


def prostate_builder(
    site: str,
    data_dir: str | Path,
    *,
    layout: str = "nifti",
    skip_unpaired: bool = False,
    merge_labels: bool = False,
    slice_foreground_value: int = SLICE_FOREGROUND_VALUE,
    name: str | None = None,
    splits: tuple[str, ...] | None = None,
    labels: bool = True,
) -> Prostate:
    """Returns the prostate builder of one site folder, registered or not.

    The six SAML sites use the registered configs (`BIDMC` for the NIfTI layout,
    `BIDMC_slices` for the slice layout); any other folder (your own site, laid out like one of
    the releases) gets a `ProstateConfig` of its own, named `site` (nifti) or `<site>_slices`.
    Build it with `builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
    manual_dir=...), file_format="array_record")`; read it with `builder.as_data_source()` or
    `tfds.data_source(f"prostate/{builder.builder_config.name}", data_dir=...)`.

    Args:
      site: the folder under `manual_dir`.
      data_dir: where TFDS writes the prepared dataset.
      layout: "nifti" or "slices".
      skip_unpaired: skip unpaired images/masks with a warning instead of failing (needed for
        the ProstateSlice I2CVB train folder, which has one of each).
      merge_labels: nifti only, merge positive zonal label values into the gland.
      slice_foreground_value: slices only, the PNG mask value of the prostate (0 in the
        ProstateSlice release; 255 for masks drawn white-on-black).
      name: config name (the dataset folder under `data_dir/prostate/`).
      splits: None for the layout's splits, or one split, e.g. `("test",)` for a test-only site;
        see `ProstateConfig`.
      labels: False for volumes or slices without masks (a site to predict only).

    Returns:
      A `Prostate` builder.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    name = name or (site if layout == "nifti" else f"{site}_slices")
    registered = Prostate.builder_configs.get(name)
    if registered is not None:
        wanted = (site, layout, splits, labels)
        if (registered.site, registered.layout, registered.splits, registered.labels) != wanted:
            raise ValueError(
                f"{name!r} is the registered config of site {registered.site}, layout "
                f"{registered.layout}, splits {registered.splits}, labels {registered.labels}; "
                "pass name= a new config name."
            )
        config: str | ProstateConfig = name
    else:
        config = ProstateConfig(
            name=name,
            site=site,
            layout=layout,
            splits=None if splits is None else tuple(splits),
            labels=labels,
            description=f"Prostate site folder {site!r}.",
        )
        config.check()
    return Prostate(
        data_dir=data_dir,
        config=config,
        skip_unpaired=skip_unpaired,
        merge_labels=merge_labels,
        slice_foreground_value=slice_foreground_value,
    )
