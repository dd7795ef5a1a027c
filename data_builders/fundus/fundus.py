"""Optic disc and cup segmentation in retinal fundus photographs, DoFE multi-domain layout."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_builders import common

_DESCRIPTION = """\
Regions of interest around the optic disc of colour fundus photographs with optic disc (OD) and
optic cup (OC) masks, as collected by DoFE (Wang et al., TMI 2020) from four public datasets, one
domain each. `mask` holds class indices: 0 background, 1 disc rim, 2 cup, so OD = mask >= 1 and
OC = mask == 2. Images keep their size unless the config's `center_crop` (or `store_size`, images
only) is set; masks always keep the size of the (cropped) released ROI.
"""

_CITATION = """\
@article{wang2020dofe,
  title={{DoFE}: Domain-oriented Feature Embedding for Generalizable Fundus Image Segmentation
         on Unseen Datasets},
  author={Wang, Shujun and Yu, Lequan and Li, Kang and Yang, Xin and Fu, Chi-Wing and
          Heng, Pheng-Ann},
  journal={IEEE Transactions on Medical Imaging},
  volume={39}, number={12}, pages={4237--4248}, year={2020}
}
"""

_INSTRUCTIONS = """\
Download the fundus archive linked from the DoFE repository (https://github.com/emma-sjwang/Dofe)
and extract it so that `manual_dir` holds one folder per domain:

  <manual_dir>/Domain1/train/ROIs/image/<name>.png    Domain1 = Drishti-GS
  <manual_dir>/Domain1/train/ROIs/mask/<name>.png     Domain2 = RIM-ONE-r3
  <manual_dir>/Domain1/test/ROIs/{image,mask}/...     Domain3 = REFUGE training set
  <manual_dir>/Domain2/...                            Domain4 = REFUGE validation set

Images and masks are paired by file name stem (extensions may differ: .png, .jpg, .bmp).
Masks are 8-bit grey or RGB with equal channels: 255 background, 128 disc rim, 0 cup.
A further domain (e.g. your own hospital) is one more folder with the same layout; see
`fundus_builder` and docs/data.md.
"""

# Stored mask value -> class index: 0 background, 1 disc rim, 2 cup.
MASK_VALUE_TO_CLASS = {255: 0, 128: 1, 0: 2}
MASK_CONVENTION = "255 background, 128 disc rim, 0 cup"

# DoFE's ROIs are 800x800; their centre 512x512 crop is what the DoFE-based papers train on.
DEFAULT_CENTER_CROP = 512


# Folder layouts of a domain: DoFE's, or one image/mask pair of folders (a single split).
LAYOUTS = ("dofe", "flat")


@dataclasses.dataclass(eq=False)
class FundusConfig(tfds.core.BuilderConfig):
    """One fundus domain.

    Attributes:
      folder: folder under `manual_dir` holding `<split>/ROIs/{image,mask}`; defaults to `name`.
      center_crop: side of the centre square kept from every image and mask (800x800 ROIs give
        `[144:656, 144:656]` at 512); images already of that size are stored as they are, smaller
        ones are an error. None keeps images whole.
      splits: the split folders to read; every one must exist and hold at least one pair.
        `("test",)` alone makes a test-only domain (a hospital the model never trained on).
      layout: "dofe" (`<folder>/<split>/ROIs/{image,mask}`) or "flat" (`<folder>/{image,mask}`,
        a single split, named by `splits`).
      labels: False builds images without masks (a domain to predict, never to score): only the
        `image` folders are read, and every stored mask holds `common.UNLABELLED_MASK_VALUE`.
      store_size: if set, images are stored resized (bilinear, antialiased) to this square size
        after cropping; masks stay at the released ROI's size, the grid evaluation scores on
        (`eval.resolution='native'`), and `spacing` stays that of one released pixel. The input
        pipeline resizes images and masks to the training size anyway, with the same
        resampling, so this only makes a dataset smaller to store or ship (e.g. to an
        accelerator host); training at `store_size` then sees identical pixels (images and
        masks).
    """

    folder: str | None = None
    center_crop: int | None = DEFAULT_CENTER_CROP
    splits: tuple[str, ...] = ("train", "test")
    store_size: int | None = None
    layout: str = "dofe"
    labels: bool = True

    @property
    def domain_folder(self) -> str:
        return self.folder or self.name

    def split_dirs(self, root: Path, split: str) -> tuple[Path, Path | None]:
        """(image folder, mask folder or None without labels) of one split under `root`."""
        base = root if self.layout == "flat" else root / split / "ROIs"
        return base / "image", (base / "mask" if self.labels else None)

    def check(self) -> None:
        """Raises `ValueError` for fields that contradict each other."""
        common.check_config_name(self.name)
        if self.layout not in LAYOUTS:
            raise ValueError(f"Config {self.name}: layout must be one of {LAYOUTS}")
        if not self.splits:
            raise ValueError(f"Config {self.name}: splits is empty")
        if self.layout == "flat" and len(self.splits) != 1:
            raise ValueError(
                f"Config {self.name}: the flat layout holds one split, got splits={self.splits}"
            )


DOMAIN_SOURCES = {
    "Domain1": "Drishti-GS",
    "Domain2": "RIM-ONE-r3",
    "Domain3": "REFUGE training set",
    "Domain4": "REFUGE validation set",
}


class Fundus(tfds.core.GeneratorBasedBuilder):
    """DatasetBuilder for the DoFE fundus domains (one config per domain)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "store_size resizes the images only: masks stay at the released ROI size "
        "(evaluation scores on it). Builds without store_size are unchanged.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
    BUILDER_CONFIGS = [
        FundusConfig(
            name=name,
            description=f"DoFE {name}: {source}, ROIs centre-cropped to {DEFAULT_CENTER_CROP}.",
        )
        for name, source in DOMAIN_SOURCES.items()
    ]

    def __init__(self, *, skip_unpaired: bool = False, **kwargs: Any):
        """Builder for one domain.

        Args:
          skip_unpaired: skip (with a warning) images without a mask and masks without an image
            instead of failing; it changes only how a build treats a defective release.
          **kwargs: `data_dir`, `config` (a name or a `FundusConfig`), `version`.
        """
        super().__init__(**kwargs)
        self._skip_unpaired = skip_unpaired
        self._original_state["skip_unpaired"] = skip_unpaired  # Kept when pickled.

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=common.segmentation_features(image_channels=3),
            supervised_keys=("image", "mask"),
            citation=_CITATION,
            # Examples are stored in sorted name order; shuffling belongs to the input pipeline.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        config = self.builder_config
        config.check()
        root = Path(dl_manager.manual_dir) / config.domain_folder
        folders = [d for s in config.splits for d in config.split_dirs(root, s) if d is not None]
        common.require_dirs(folders, _INSTRUCTIONS)
        splits = {}
        for split in config.splits:
            image_dir, mask_dir = config.split_dirs(root, split)
            what = f"{split} split of domain {config.name}"
            if mask_dir is None:
                pairs = common.folder_images(image_dir, what=what)
            else:
                pairs = common.folder_pairs(
                    image_dir, mask_dir, skip_unpaired=self._skip_unpaired, what=what
                )
            splits[split] = self._generate_examples(pairs)
        return splits

    def _generate_examples(
        self, pairs: list[tuple[str, Path, Path | None]]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        crop = self.builder_config.center_crop
        for name, image_path, mask_path in pairs:
            image = common.read_image(image_path, channels=3)
            if mask_path is None:
                mask = common.unlabelled_mask(image.array.shape[:2])
            else:
                stored = common.read_grey(mask_path)
                common.check_same_size(image.array, stored, image_path, mask_path)
                mask = common.map_mask_values(
                    stored, MASK_VALUE_TO_CLASS, mask_path, MASK_CONVENTION
                )
            array, image_bytes = image.array, image.png_bytes
            if crop is not None and array.shape[:2] != (crop, crop):
                window = center_crop_window(array.shape[:2], crop, image_path)
                array, mask, image_bytes = array[window], mask[window], None
            size = self.builder_config.store_size
            if size is not None:
                # The image only: the mask keeps the released grid, which evaluation scores on.
                array = common.resize_image(array, size, nearest=False)
                image_bytes = None
            if image_bytes is None:
                image_bytes = common.encode_png(array)
            yield (
                common.example_key(name, 0),
                {
                    "image": image_bytes,
                    "mask": common.encode_png(mask),
                    "case_id": name,
                    "slice_index": 0,
                    "num_slices": 1,
                    # Of one mask pixel (a released one). Physical pixel size differs per
                    # camera and is not in the release.
                    "spacing": np.ones(3, dtype=np.float32),
                    "spacing_unit": "pixel",
                    "domain": self.builder_config.domain_folder,
                },
            )


def center_crop_window(
    shape: tuple[int, int], crop: int, path: Path | str = "image"
) -> tuple[slice, slice]:
    """The centre `crop`x`crop` window of an image of `shape` ((800, 800) -> [144:656, 144:656])."""
    height, width = shape
    if height < crop or width < crop:
        raise common.DataError(
            f"{path}: {height}x{width} is smaller than the centre crop {crop}x{crop}; "
            "build with a config whose center_crop is None or smaller."
        )
    top, left = (height - crop) // 2, (width - crop) // 2
    return slice(top, top + crop), slice(left, left + crop)


def fundus_builder(
    domain: str,
    data_dir: str | Path,
    *,
    center_crop: int | None = DEFAULT_CENTER_CROP,
    splits: tuple[str, ...] = ("train", "test"),
    skip_unpaired: bool = False,
    name: str | None = None,
    layout: str = "dofe",
    labels: bool = True,
) -> Fundus:
    """Returns the fundus builder of one domain folder, registered or not.

    `Domain1`..`Domain4` with the default crop and splits use the registered configs; any other
    folder (e.g. `Domain5`, your own hospital, laid out as `<domain>/<split>/ROIs/{image,mask}`)
    or option gets a `FundusConfig` of its own. Build it with
    `builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
    manual_dir=...), file_format="array_record")`; read it with `builder.as_data_source()`
    or `tfds.data_source(f"fundus/{name}", data_dir=...)`.

    Args:
      domain: the folder under `manual_dir`.
      data_dir: where TFDS writes the prepared dataset.
      center_crop: see `FundusConfig.center_crop`.
      splits: the split folders to read.
      skip_unpaired: skip unpaired images/masks with a warning instead of failing.
      name: config name (the dataset folder under `data_dir/fundus/`); defaults to `domain`. A
        registered domain read with non-default options needs a new name, e.g. `Domain1_full`.
      layout: "dofe" or "flat" (`<domain>/{image,mask}`, one split), see `FundusConfig`.
      labels: False for images without masks (a domain to predict only), see `FundusConfig`.

    Returns:
      A `Fundus` builder.
    """
    name = name or domain
    registered = Fundus.builder_configs.get(name)
    if (
        registered is not None
        and registered.domain_folder == domain
        and registered.center_crop == center_crop
        and tuple(registered.splits) == tuple(splits)
        and (registered.layout, registered.labels) == (layout, labels)
    ):
        config: str | FundusConfig = name
    elif registered is not None:
        raise ValueError(
            f"{name!r} is a registered config with center_crop={registered.center_crop}, "
            f"splits={registered.splits}, layout={registered.layout!r}, "
            f"labels={registered.labels}; pass name= a new config name for other options."
        )
    else:
        config = FundusConfig(
            name=name,
            folder=domain,
            center_crop=center_crop,
            splits=tuple(splits),
            layout=layout,
            labels=labels,
            description=f"Fundus domain from folder {domain!r}, center_crop={center_crop}, "
            f"layout={layout}, labels={labels}.",
        )
        config.check()
    return Fundus(data_dir=data_dir, config=config, skip_unpaired=skip_unpaired)
