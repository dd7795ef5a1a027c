"""A user's folder of a new hospital: its layout checked and built as a test-only TFDS domain."""

import dataclasses
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
import tensorflow_datasets as tfds
from PIL import Image

from data_builders import common
from data_builders.fundus import fundus
from data_builders.prostate import prostate
from puseg_jax.core import logging_utils
from puseg_jax.core.datasets import DatasetInfo, get_dataset_info

ROLE = "external"

SPLIT = "test"

# The TFDS config name of the prepared domain; it lives in a private data dir of its own.
DOMAIN = "external"

# Dataset family (config.data.name) -> the builder that reads a user's folder for it. The
# synthetic families share the real families' label conventions, so a synthetic-trained model
# (the demo) can be run on real folders too.
FOLDER_BUILDERS = {
    "fundus": "fundus",
    "synth_fundus": "fundus",
    "prostate": "prostate",
    "prostate_slices": "prostate",
    "synth_prostate": "prostate",
}

LABELS = ("auto", "yes", "no")

# ---------------------------------------------------------------------------------------------
# The user's folder.


@dataclasses.dataclass(frozen=True)
class ExternalData:
    """A user's folder, checked and listed before anything is built.

    Attributes:
      root: the folder.
      builder: 'fundus' or 'prostate'.
      layout: 'dofe' | 'flat' (fundus) or 'nifti'.
      labels: whether every case has its mask.
      images: {case_id: the case's image file}, the grid and header the outputs take.
      center_crop: fundus only: the centre square the model sees (None: whole images).
    """

    root: Path
    builder: str
    layout: str
    labels: bool
    images: dict[str, Path]
    center_crop: int | None = None


def folder_builder(family: str) -> str:
    """The builder that reads a user's folder for a dataset family; unknown families raise."""
    get_dataset_info(family)  # an unknown family raises, naming the known ones
    if family not in FOLDER_BUILDERS:
        raise ValueError(
            f"Dataset family {family!r} cannot read a folder of your own; families that can: "
            f"{sorted(FOLDER_BUILDERS)}"
        )
    return FOLDER_BUILDERS[family]


def _want_labels(labels: str, found: bool, where: str) -> bool:
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
    if labels == "yes" and not found:
        raise FileNotFoundError(f"labels='yes' but there are no masks/labels in {where}")
    return found if labels == "auto" else labels == "yes"


def find_fundus_data(
    root: Path, labels: str = "auto", center_crop: int | None = None
) -> ExternalData:
    """Checks and lists a fundus folder: DoFE `test/ROIs/{image,mask}` or flat `{image,mask}`.

    Args:
      root: the folder.
      labels: 'auto' (masks when the mask folder exists), 'yes' (masks required) or 'no'.
      center_crop: the centre square the model sees (None: whole images).

    Returns:
      The `ExternalData`.

    Raises:
      FileNotFoundError: no layout found (the message shows both), or masks required but absent.
      DataError: both layouts at once, no images, or images and masks that do not pair.
    """
    dofe, flat = root / SPLIT / "ROIs", root
    has = {k: (base / "image").is_dir() for k, base in (("dofe", dofe), ("flat", flat))}
    if has["dofe"] and has["flat"]:
        raise common.DataError(
            f"{root} holds both {dofe / 'image'} and {flat / 'image'}: keep one layout"
        )
    if not any(has.values()):
        raise FileNotFoundError(
            f"No images found in {root}. Expected one of:\n"
            f"  {dofe}/image/<case>.png [+ {dofe}/mask/<case>.png]   (DoFE layout, test only)\n"
            f"  {flat}/image/<case>.png [+ {flat}/mask/<case>.png]   (flat layout)\n"
            "Masks (optional): 8-bit, 255 background, 128 disc rim, 0 cup."
        )
    layout = "dofe" if has["dofe"] else "flat"
    base = dofe if has["dofe"] else flat
    image_dir, mask_dir = base / "image", base / "mask"
    with_labels = _want_labels(labels, mask_dir.is_dir(), str(base))
    images = common.list_by_stem(image_dir)
    if not images:
        raise common.DataError(
            f"No image files ({', '.join(common.IMAGE_SUFFIXES)}) in {image_dir}"
        )
    if center_crop is not None:
        # The builder would refuse them too, but only half way and without the flag to use.
        for path in images.values():
            with Image.open(path) as im:
                width, height = im.size
            if height < center_crop or width < center_crop:
                raise common.DataError(
                    f"{path} is {height}x{width}, smaller than the centre crop {center_crop} the "
                    "model saw in training; pass --center_crop none (whole images) or a smaller "
                    "side"
                )
    if with_labels:
        # The mask folder promises a mask for every image: any image without one is an error.
        common.pair_files(
            images,
            common.list_by_stem(mask_dir),
            skip_unpaired=False,
            where=f"{image_dir} and {mask_dir}",
        )
    return ExternalData(root, "fundus", layout, with_labels, images, center_crop)


def find_nifti_data(root: Path, labels: str = "auto") -> ExternalData:
    """Checks and lists a folder of NIfTI volumes (SAML naming, labels for all or none).

    Args:
      root: the folder.
      labels: 'auto' (labels when any `<case>_segmentation.nii[.gz]` exists), 'yes' or 'no'.

    Returns:
      The `ExternalData`.

    Raises:
      DataError: no volumes, or (with labels) volumes without their label or labels without
        their volume.
    """
    images, label_files = prostate.list_nifti_files(root)
    if not images:
        raise common.DataError(
            f"No NIfTI volumes in {root}: expected <case>.nii.gz files (labels, optional: "
            "<case>_segmentation.nii.gz, 0 background, 1 prostate)"
        )
    with_labels = _want_labels(labels, bool(label_files), str(root))
    if with_labels:
        common.pair_files(images, label_files, skip_unpaired=False, where=str(root))
    return ExternalData(root, "prostate", "nifti", with_labels, images)


def find_external_data(
    data: str | os.PathLike,
    family: str,
    labels: str = "auto",
    center_crop: int | None = None,
) -> ExternalData:
    """Checks and lists the user's folder for a dataset family (see the module's layouts)."""
    root = Path(data).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"--data {data}: no such folder")
    builder = folder_builder(family)
    if builder == "fundus":
        return find_fundus_data(root, labels, center_crop)
    return find_nifti_data(root, labels)


def training_center_crop(config: ml_collections.ConfigDict) -> int | None:
    """The centre crop a fundus run's data were built with (what the model saw), None for the
    synthetic families (their images were never cropped)."""
    if config.data.name != "fundus":
        return None
    kwargs = config.data.builder_config.to_dict() if config.data.builder_config else {}
    # `prepare.get_builder` reads None as "as the registered config": the registered crop.
    return kwargs.get("center_crop") or fundus.DEFAULT_CENTER_CROP


def prepare_external(
    ext: ExternalData,
    info: DatasetInfo,
    config: ml_collections.ConfigDict,
    data_dir: str,
    builder_options: Mapping[str, Any] | None = None,
) -> tuple[DatasetInfo, ml_collections.ConfigDict]:
    """Builds the user's folder as the test-only domain `DOMAIN` into `data_dir`.

    Args:
      ext: the checked folder.
      info: the run's dataset family.
      config: the run's config.
      data_dir: a private TFDS data dir (the build is thrown away afterwards).
      builder_options: the builder's own arguments (prostate: merge_labels); skip_unpaired is
        always False.

    Returns:
      (the family info reading `DOMAIN` through the folder's builder, a copy of `config` that
      reads it: data_dir, data.builder_config and data.builder_options replaced).
    """
    kwargs = dict(builder_options or {})
    kwargs.pop("skip_unpaired", None)
    if ext.builder == "fundus":
        builder_config = dict(
            folder=ext.root.name,
            splits=(SPLIT,),
            layout=ext.layout,
            labels=ext.labels,
            center_crop=ext.center_crop,
        )
        builder = fundus.fundus_builder(
            ext.root.name,
            data_dir,
            center_crop=ext.center_crop,
            splits=(SPLIT,),
            name=DOMAIN,
            layout=ext.layout,
            labels=ext.labels,
        )
    else:
        builder_config = dict(site=ext.root.name, splits=(SPLIT,), labels=ext.labels)
        merge = {k: v for k, v in kwargs.items() if k == "merge_labels"}
        builder = prostate.prostate_builder(
            ext.root.name,
            data_dir,
            layout="nifti",
            name=DOMAIN,
            splits=(SPLIT,),
            labels=ext.labels,
            **merge,
        )
    t0 = time.time()
    labelled = "with labels" if ext.labels else "without labels"
    print(f"[prepare] building {ext.root} ({ext.layout} layout, {labelled}) ...", flush=True)
    if not logging_utils.progress_bars():
        tfds.disable_progress_bar()
    # TFDS's banners say what the [prepare] lines say: they go to the log (as in prepare.py).
    with logging_utils.stdout_to_log():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(ext.root.parent)),
            file_format="array_record",
        )
    counts = {k: v.num_examples for k, v in builder.info.splits.items()}
    print(f"[prepare] {ext.root.name}: {counts} ({time.time() - t0:.1f} s)", flush=True)
    ext_info = dataclasses.replace(info, builder=ext.builder, domains=(DOMAIN,), config_suffix="")
    ext_config = ml_collections.ConfigDict(config.to_dict())
    ext_config.data.data_dir = data_dir
    ext_config.data.manual_dir = str(ext.root.parent)
    # Only the name matters to read a prepared dataset; the fields keep the reader's config
    # faithful to the build (None would mean "as the registered config" to prepare.get_builder).
    ext_config.data.builder_config = ml_collections.ConfigDict(
        {k: v for k, v in builder_config.items() if v is not None}
    )
    ext_config.data.builder_options = ml_collections.ConfigDict()
    return ext_info, ext_config
