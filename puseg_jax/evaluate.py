"""A trained model on a hospital it never saw: `python -m puseg_jax.evaluate`.

    python -m puseg_jax.evaluate --workdir W --data DIR [--name NAME]

builds DIR as a test-only domain of W's dataset family (its `config.json`), predicts every case
with W's reported checkpoint (the one its `summary.json` names: the last, or the best on source
validation) and writes `W/eval/NAME/` (NAME defaults to DIR's folder name) like a target
domain's report, with role 'external':

* `summary.json`, `per_case.csv`, `predictions.npz`, `panel_*.png` and TensorBoard events
  (`tb/`) as `evaluation.write_domain_reports` writes them for a target. With labels the cases
  are scored exactly as a target evaluator scores them (`evaluation.score_split`: on the grid of
  the run's `eval.resolution`, native by default, with its 'resolution', 'distance' and
  'uncertainty_resolution' fields). Without labels nothing is scored (the summary says so) and
  the panels show image, prediction and uncertainty;
* `review.csv`: the cases ranked by a quality-control score, most doubtful first (`quality.py`),
  with the predicted size and, with labels, the Dice;
* `predictions/`: the predictions in the user's own formats, on the original grid: for NIfTI
  volumes `<case>_pred.nii.gz` (labels) and `<case>_uncertainty.nii.gz` (float32 in [0, 1]),
  with the input's affine and shape; for fundus images `<case>_pred.png` in the release's
  convention (0 cup, 128 disc rim, 255 background) and `<case>_uncertainty.png` (8-bit, U * 255),
  of the image's size. They are the native probabilities native scoring thresholds
  (`evaluation.native_probs`), post-processed as the scores are: with labels and native
  scoring, a written mask scores what per_case.csv says.

Layouts of DIR:

* fundus families (`fundus`, `synth_fundus`): DoFE's `DIR/test/ROIs/{image,mask}/` (a domain
  folder without `train/`), or a flat `DIR/image/` + `DIR/mask/`; without the `mask` folder the
  images are predicted unlabelled. Masks use the 0/128/255 convention. The training's centre crop
  (512 for the real fundus family) is applied, and the region outside it is written as
  background with uncertainty 0 (it was not predicted).
* prostate families (`prostate`, `prostate_slices`, `synth_prostate`): a folder of NIfTI volumes,
  SAML naming (`Case00.nii.gz` + `Case00_segmentation.nii.gz`), all with labels or none.

Everything is written into a hidden folder beside the result (`W/eval/.partial-NAME-*`) and
renamed to `W/eval/NAME` at the end: a failure leaves nothing half-written. The console shows
the `[prepare]` and `[eval]` lines; every log line goes to `W/log.txt`
(`logging_utils.setup_run_log`, `--verbose` or `PUSEG_VERBOSE=1` for all of it on the console).

Only `main` knows about flags; `evaluate_external` is the function.
"""

import argparse
import csv
import dataclasses
import functools
import json
import logging as pylogging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import nibabel as nib
import numpy as np
import optax
import tensorflow_datasets as tfds
from absl import flags as absl_flags
from absl import logging
from PIL import Image

from data_builders import common
from data_builders.fundus import fundus
from data_builders.prostate import prostate
from puseg_jax import (
    checkpointing,
    evaluation,
    inspect_utils,
    logging_utils,
    parallel,
    quality,
    train,
)
from puseg_jax.datasets import DatasetInfo, get_dataset_info
from puseg_jax.logging_utils import MetricWriter

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
PREDICTIONS_DIR = "predictions"
REVIEW_FILE = "review.csv"
NO_SCORE_NOTE = "No labels: predictions and uncertainty maps were written, no score was computed."
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
    kwargs = config.data.build_kwargs.to_dict() if config.data.build_kwargs else {}
    # `prepare.get_builder` reads None as "as the registered config": the registered crop.
    return kwargs.get("center_crop") or fundus.DEFAULT_CENTER_CROP


def prepare_external(
    ext: ExternalData,
    info: DatasetInfo,
    config: ml_collections.ConfigDict,
    data_dir: str,
    builder_kwargs: Mapping[str, Any] | None = None,
) -> tuple[DatasetInfo, ml_collections.ConfigDict]:
    """Builds the user's folder as the test-only domain `DOMAIN` into `data_dir`.

    Args:
      ext: the checked folder.
      info: the run's dataset family.
      config: the run's config.
      data_dir: a private TFDS data dir (the build is thrown away afterwards).
      builder_kwargs: builder arguments (prostate: merge_labels); skip_unpaired is always False.

    Returns:
      (the family info reading `DOMAIN` through the folder's builder, a copy of `config` that
      reads it: data_dir, build_kwargs and builder_kwargs replaced).
    """
    kwargs = dict(builder_kwargs or {})
    kwargs.pop("skip_unpaired", None)
    if ext.builder == "fundus":
        build_kwargs = dict(
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
        build_kwargs = dict(site=ext.root.name, splits=(SPLIT,), labels=ext.labels)
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
    ext_config.data.build_kwargs = ml_collections.ConfigDict(
        {k: v for k, v in build_kwargs.items() if v is not None}
    )
    ext_config.data.builder_kwargs = ml_collections.ConfigDict()
    return ext_info, ext_config


# ---------------------------------------------------------------------------------------------
# The run: config, reported checkpoint, name of the report.


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with (its config.json), checked: its dataset family
    must have a folder builder."""
    config = inspect_utils.load_config(workdir, announce="[eval]")
    folder_builder(config.data.name)
    return config


def reported_checkpoint(workdir: str) -> tuple[str, int, str]:
    """The checkpoint a finished run reported: (which folder 'last' | 'best', step, its label
    as summary.json writes it, 'last' or 'best@<step>').

    Raises:
      FileNotFoundError: no summary.json (the run has not finished its final evaluation, or this
        is not a workdir), or no checkpoint at that step.
    """
    path = os.path.join(workdir, "summary.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: the run in {workdir} has not finished (its summary names the "
            "checkpoint it reports). Finish or resume the training, or write the summary with "
            "`python -m puseg_jax.main --config ... --workdir W --mode=eval`."
        )
    with open(path) as f:
        summary = json.load(f)
    label, step = str(summary.get("checkpoint", "")), summary.get("step")
    if label == "last":
        which = "last"
    elif label.startswith("best@"):
        which, step = "best", int(label.split("@", 1)[1])
    else:
        raise ValueError(f"{path}: unknown checkpoint {label!r} (expected 'last' or 'best@N')")
    folder = os.path.join(workdir, "checkpoints", which)
    steps = (
        sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []
    )
    if step is None or int(step) not in steps:
        raise FileNotFoundError(
            f"{workdir}: summary.json reports checkpoint {label!r} at step {step}, but "
            f"{folder} holds steps {steps}"
        )
    return which, int(step), label


def check_name(workdir: str, config: ml_collections.ConfigDict, name: str, overwrite: bool) -> None:
    """Refuses a report name that is not a plain folder name, that an evaluator of the run owns,
    or that exists already (unless `overwrite`)."""
    if not _NAME.match(name):
        raise ValueError(
            f"--name {name!r}: use letters, digits, '_', '.' and '-', starting with a letter or "
            "digit"
        )
    evals = train.resolve_evals(config)
    if name in evals:
        raise ValueError(
            f"--name {name!r} is an evaluator of {workdir} (role {evals[name]['role']}); its "
            "report would be overwritten. Pick another --name."
        )
    target = os.path.join(workdir, "eval", name)
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")


def restore_model(
    config: ml_collections.ConfigDict, info: DatasetInfo, workdir: str, which: str, step: int, mesh
):
    """The reported state placed for the eval step, and the wrapped eval step.

    The parameters and BatchNorm statistics are read from the checkpoint's own metadata, so no
    model is initialised (no compilation besides the eval step's); the optimizer is not needed.
    """
    strategy = config.parallel.strategy
    _, raw = checkpointing.load_state(workdir, step, which)
    model = train.create_model(config, info)
    tx = optax.identity()
    state = train.TrainState(
        step=raw["step"],
        apply_fn=model.apply,
        params=raw["params"],
        tx=tx,
        opt_state=tx.init(raw["params"]),
        batch_stats=raw.get("batch_stats", {}),
    )
    state = parallel.replicate(jax.device_get(state), mesh, strategy)
    p_eval_step = parallel.wrap_eval_step(
        functools.partial(train.eval_step, config=config, label_mode=info.label_mode),
        mesh,
        strategy,
    )
    return state, p_eval_step


# ---------------------------------------------------------------------------------------------
# Predictions on the original grid, in the user's formats.


def uncertainty_to_uint8(u: np.ndarray) -> np.ndarray:
    """U in [0, 1] -> 8-bit (round(U * 255))."""
    return np.round(np.clip(np.asarray(u, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def fundus_release_mask(pred_masks: np.ndarray) -> np.ndarray:
    """Nested structure masks [2, H, W] (disc, cup) -> the release's 0/128/255 mask."""
    classes = pred_masks.astype(np.uint8).sum(axis=0)  # 0 background, 1 rim, 2 cup (nested)
    lookup = np.zeros(256, np.uint8)
    for value, label in fundus.MASK_VALUE_TO_CLASS.items():
        lookup[label] = value
    return lookup[classes]


def label_volume(pred_masks: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """Structure masks [S, ...] -> uint8 class indices (structure s is s + 1; nested sigmoid
    structures are counted up, as the builders store them)."""
    if info.label_mode == "sigmoid":
        return pred_masks.astype(np.uint8).sum(axis=0).astype(np.uint8)
    out = np.zeros(pred_masks.shape[1:], np.uint8)
    for s, m in enumerate(pred_masks):
        out[m] = s + 1
    return out


def native_case(
    pred: Mapping[str, np.ndarray],
    idx: np.ndarray,
    info: DatasetInfo,
    config: ml_collections.ConfigDict,
) -> tuple[np.ndarray, np.ndarray]:
    """One case's post-processed prediction and uncertainty on its native grid.

    The probabilities are those native scoring thresholds (`evaluation.native_probs`: bilinear
    from the network's grid to the builder's native grid, the released image after the centre
    crop or the volume's own slices), post-processed as `evaluation.score_cases` does (in 3-D
    for volumes); the uncertainty map is resampled the same way, as `uncertainty_quality` does.

    Returns:
      (structure masks [S, D, H, W] bool, uncertainty [D, H, W] float32 in [0, 1]), D = 1 for
      an image.
    """
    probs = evaluation.native_probs(pred, idx)
    unc = np.clip(evaluation.native_probs(pred, idx, key="uncertainty"), 0.0, 1.0)
    if info.volumetric:
        pm = evaluation.structure_masks(probs, info, config)
    else:
        pm = evaluation.structure_masks(probs[0], info, config)[:, None]
    return pm, unc.astype(np.float32)


def write_fundus_case(
    pred_masks: np.ndarray,
    uncertainty: np.ndarray,
    image_path: Path,
    center_crop: int | None,
    info: DatasetInfo,
    out_dir: str,
    case_id: str,
) -> dict[str, Any]:
    """Writes one fundus image's prediction and uncertainty PNGs at the image's own size.

    Args:
      pred_masks: the structures on the native grid [S, h, w] (`native_case`): the centre crop
        the network saw, or the whole image.
      uncertainty: [h, w] in [0, 1], same grid.
      image_path: the user's image (its size is the output's).
      center_crop: the crop the native grid is (None: the whole image).
      info: the family.
      out_dir: where the files go.
      case_id: the case.

    Returns:
      {'files': [...], 'size': {structure: predicted pixels of the image}}; outside the crop the
      mask is background and the uncertainty 0 (not predicted).
    """
    with Image.open(image_path) as im:
        width, height = im.size
    window = (slice(0, height), slice(0, width))
    if center_crop is not None and (height, width) != (center_crop, center_crop):
        window = fundus.center_crop_window((height, width), center_crop, image_path)
    grid = (window[0].stop - window[0].start, window[1].stop - window[1].start)
    if pred_masks.shape[1:] != grid or uncertainty.shape != grid:
        raise ValueError(
            f"{image_path}: prediction of shape {pred_masks.shape[1:]} for a native grid of "
            f"{grid} (image {height}x{width}, centre crop {center_crop})"
        )
    mask = np.full((height, width), 255, np.uint8)
    mask[window] = fundus_release_mask(pred_masks)
    unc = np.zeros((height, width), np.uint8)
    unc[window] = uncertainty_to_uint8(uncertainty)
    files = [
        os.path.join(out_dir, f"{case_id}_pred.png"),
        os.path.join(out_dir, f"{case_id}_uncertainty.png"),
    ]
    Image.fromarray(mask, "L").save(files[0])
    Image.fromarray(unc, "L").save(files[1])
    size = {s: int(pred_masks[i].sum()) for i, s in enumerate(info.structures)}
    return {"files": files, "size": size}


def _save_like(array: np.ndarray, image: nib.Nifti1Image, path: str) -> None:
    header = image.header.copy()
    header.set_data_dtype(array.dtype)
    if array.shape != image.shape and array.size == int(np.prod(image.shape)):
        array = array.reshape(image.shape)  # e.g. a (X, Y, Z, 1) input
    nib.save(nib.Nifti1Image(array, image.affine, header), path)


def write_nifti_case(
    pred_masks: np.ndarray,
    uncertainty: np.ndarray,
    image_path: Path,
    info: DatasetInfo,
    out_dir: str,
    case_id: str,
) -> dict[str, Any]:
    """Writes `<case>_pred.nii.gz` and `<case>_uncertainty.nii.gz` with the input's affine and
    shape.

    Args:
      pred_masks: the structures on the volume's native grid [S, D, rows, cols] in the builder's
        display layout (`native_case`).
      uncertainty: [D, rows, cols] in [0, 1], same grid.
      image_path: the user's volume (its header and voxel order are the outputs').
      info: the family.
      out_dir: where the files go.
      case_id: the case.

    Returns:
      {'files': [...], 'size': {structure: predicted volume in mm^3}}.
    """
    image = nib.load(image_path)
    labels = label_volume(pred_masks, info).transpose(1, 2, 0)  # (rows, cols, slices)
    files = [
        os.path.join(out_dir, f"{case_id}_pred.nii.gz"),
        os.path.join(out_dir, f"{case_id}_uncertainty.nii.gz"),
    ]
    # display_to_file refuses a volume that is not laid out like the file's.
    _save_like(prostate.display_to_file(labels, image), image, files[0])
    _save_like(prostate.display_to_file(uncertainty.transpose(1, 2, 0), image), image, files[1])
    voxel = float(np.prod(image.header.get_zooms()[:3]))
    size = {s: float(pred_masks[i].sum() * voxel) for i, s in enumerate(info.structures)}
    return {"files": files, "size": size}


def write_native_predictions(
    pred: Mapping[str, np.ndarray],
    ext: ExternalData,
    info: DatasetInfo,
    config: ml_collections.ConfigDict,
    out_dir: str,
) -> dict[str, dict[str, Any]]:
    """Every case's prediction and uncertainty in the user's format, on the original grid.

    Args:
      pred: `evaluation.predict_split` output of the external domain ('native_shape' per
        example).
      ext: the folder it was built from (original files).
      info: the family info reading it.
      config: the config (post-processing).
      out_dir: where the files go.

    Returns:
      {case_id: {'files', 'size'}}; size in pixels of the image (fundus) or mm^3 (NIfTI).
    """
    os.makedirs(out_dir, exist_ok=True)
    out = {}
    for case_id, idx in evaluation.group_cases(pred, info.volumetric):
        if case_id not in ext.images:
            raise ValueError(f"Predicted case {case_id!r} is not a file of {ext.root}")
        pm, unc = native_case(pred, idx, info, config)
        path = ext.images[case_id]
        if ext.builder == "fundus":
            out[case_id] = write_fundus_case(
                pm[:, 0], unc[0], path, ext.center_crop, info, out_dir, case_id
            )
        else:
            out[case_id] = write_nifti_case(pm, unc, path, info, out_dir, case_id)
    return out


# ---------------------------------------------------------------------------------------------
# Quality control: the score, its choice on source validation, review.csv.


def source_val_predictions(
    workdir: str, config: ml_collections.ConfigDict
) -> tuple[dict[str, dict], dict[str, dict], str]:
    """The saved predictions and per-case Dice of a run's source-validation evaluators.

    Returns:
      ({evaluator: predictions as `predict_split` names them}, {evaluator: {case_id:
      {structure: Dice}}}, '' or the reason they are not available).
    """
    names = [n for n, e in train.resolve_evals(config).items() if e["role"] == "source_val"]
    if not names:
        return {}, {}, "the run has no source-validation evaluator"
    preds, dice = {}, {}
    for n in names:
        folder = os.path.join(workdir, "eval", n)
        npz, csv_path = (
            os.path.join(folder, "predictions.npz"),
            os.path.join(folder, "per_case.csv"),
        )
        if not (os.path.isfile(npz) and os.path.isfile(csv_path)):
            return {}, {}, f"{folder} has no predictions.npz and per_case.csv"
        with np.load(npz) as z:
            preds[n] = {
                "probs": z["probability"].astype(np.float32),
                "uncertainty": z["uncertainty"].astype(np.float32),
                "case_id": z["case_id"],
                "slice_index": z["slice_index"],
            }
        dice[n] = {}
        with open(csv_path, newline="") as f:
            for row in csv.DictReader(f):
                dice[n].setdefault(row["case_id"], {})[row["structure"]] = float(row["dice"])
    return preds, dice, ""


def choose_on_source_val(
    workdir: str,
    config: ml_collections.ConfigDict,
    info: DatasetInfo,
    thresholds: Mapping[str, float],
) -> dict[str, Any]:
    """`quality.choose_qc_score` on the run's source-validation cases (never a target).

    The predictions are those the final evaluation saved (`eval.save_predictions`), of the
    reported checkpoint; probabilities were stored as float16, so a mask recomputed from them can
    differ from the scored one on pixels within rounding of the threshold.

    Returns:
      The choice with 'source' (the evaluators used); `quality.FALLBACK_QC_SCORE` with the
      reason when the run saved no source-validation predictions.
    """
    preds, dice, missing = source_val_predictions(workdir, config)
    if missing:
        return {
            "score": quality.FALLBACK_QC_SCORE,
            "criterion": "fallback",
            "reason": missing,
            "source": [],
        }
    rows, all_dice = [], {}
    for n, pred in preds.items():
        for r in quality.case_qc(pred, info, config):
            key = f"{n}/{r['case_id']}"  # case ids repeat across domains
            rows.append(dict(r, case_id=key))
            all_dice[key] = dice[n][r["case_id"]]
    choice = quality.choose_qc_score(rows, all_dice, thresholds)
    choice["source"] = list(preds)
    return choice


REVIEW_COLUMNS = ("rank", "case_id", "qc_score")


def review_rows(
    qc_rows: Sequence[Mapping[str, Any]],
    score: str,
    sizes: Mapping[str, Mapping[str, float]],
    size_unit: str,
    info: DatasetInfo,
    dice: Mapping[str, Mapping[str, float]] | None,
    thresholds: Mapping[str, float],
) -> list[dict[str, Any]]:
    """review.csv's rows: every case, most doubtful first (ties keep the cases' order).

    Columns: rank, case_id, qc_score (the case's), per structure qc_<s> and predicted_<s> (size
    on the original grid, in `size_unit`), size_unit, and with labels dice_<s> and `fails`
    (any structure below its threshold).
    """
    rows = []
    for r in qc_rows:
        c = r["case_id"]
        row: dict[str, Any] = {"case_id": c, "qc_score": quality.case_score(r["scores"][score])}
        for s in info.structures:
            row[f"qc_{s}"] = r["scores"][score][s]
        for s in info.structures:
            row[f"predicted_{s}"] = sizes[c][s]
        row["size_unit"] = size_unit
        if dice is not None:
            for s in info.structures:
                row[f"dice_{s}"] = dice[c][s]
            row["fails"] = any(dice[c][s] < t for s, t in thresholds.items())
        rows.append(row)
    order = sorted(range(len(rows)), key=lambda i: -rows[i]["qc_score"])  # stable
    return [dict(rank=k + 1, **rows[i]) for k, i in enumerate(order)]


def write_review(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """review.csv (an infinite score, an empty prediction, is written 'inf')."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


# ---------------------------------------------------------------------------------------------
# Reports.


def _scalars(name: str, res: dict) -> dict[str, float]:
    """The report's scalars for TensorBoard (undefined ones, e.g. an AUROC without failures,
    left out)."""
    out = {}
    for s, sm in res.get("structures", {}).items():
        for m in evaluation.SURFACE_METRICS:
            out[f"eval/{name}/{s}/{m}"] = sm[m]["mean"]
    for k, v in res.get("uncertainty", {}).items():
        if k != "reliability":
            out[f"eval/{name}/uncertainty/{k}"] = v
    for s, d in res["qc"].get("detection", {}).items():
        out[f"eval/{name}/qc/{s}/auroc"] = d["auroc"]
        out[f"eval/{name}/qc/{s}/spearman"] = d["spearman"]
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


# ---------------------------------------------------------------------------------------------
# The whole evaluation.


def evaluate_external(
    workdir: str,
    data: str | os.PathLike,
    name: str | None = None,
    labels: str = "auto",
    fail_dice: float | Mapping[str, float] = quality.DEFAULT_FAIL_DICE,
    qc_score: str = "auto",
    center_crop: int | None | str = "train",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluates a run's reported checkpoint on a folder of the user's own (a test-only domain)
    and writes `<workdir>/eval/<name>/` (see the module docstring).

    Args:
      workdir: a finished training workdir (config.json, summary.json, checkpoints/).
      data: the user's folder.
      name: the report's name; default the folder's name.
      labels: 'auto' (use masks when present), 'yes' (masks required) or 'no' (ignore them).
      fail_dice: a case fails a structure below this Dice (one number, or per structure).
      qc_score: 'auto' (chosen on the run's source validation) or one of `quality.QC_SCORES`.
      center_crop: fundus only: 'train' (what the model saw), an int, or None (whole images).
      overwrite: replace an existing `eval/<name>` of an earlier external evaluation.

    Returns:
      The written summary.json content.
    """
    # ---- checks, before anything is built or compiled -------------------------------------
    workdir = os.path.abspath(workdir)
    config = load_run_config(workdir)
    info = train.validate_config(config)
    which, step, checkpoint = reported_checkpoint(workdir)
    name = name or Path(data).expanduser().resolve().name
    check_name(workdir, config, name, overwrite)
    if qc_score != "auto" and qc_score not in quality.QC_SCORES:
        raise ValueError(f"qc_score must be 'auto' or one of {quality.QC_SCORES}, got {qc_score!r}")
    thresholds = quality.fail_thresholds(fail_dice, info.structures)
    crop = training_center_crop(config) if center_crop == "train" else center_crop
    if crop is not None and (not isinstance(crop, int) or crop < 1):
        raise ValueError(f"center_crop must be 'train', None or a positive int, got {crop!r}")
    ext = find_external_data(data, config.data.name, labels, crop)

    eval_root = os.path.join(workdir, "eval")
    os.makedirs(eval_root, exist_ok=True)
    stage_root = tempfile.mkdtemp(prefix=f".partial-{name}-", dir=eval_root)
    try:
        # ---- build the folder as a test-only domain ------------------------------------------
        ctor = config.data.get("builder_kwargs")
        ext_info, ext_config = prepare_external(
            ext, info, config, os.path.join(stage_root, "tfds"), ctor.to_dict() if ctor else {}
        )

        # ---- predict with the reported checkpoint --------------------------------------------
        mesh = parallel.create_mesh(config.parallel.num_devices)
        n_dev = mesh.devices.size
        # Any device count: the batch is padded anyway, so round it up to a multiple.
        ext_config.eval.batch_size = -(-int(config.eval.batch_size) // n_dev) * n_dev
        state, p_eval_step = restore_model(config, info, workdir, which, step, mesh)
        _, _, eval_rng = jax.random.split(jax.random.key(config.seed), 3)
        pred = evaluation.predict_split(
            p_eval_step,
            state,
            eval_rng,
            ext_config,
            ext_info,
            ext_config.data.data_dir,
            mesh,
            config.parallel.strategy,
            DOMAIN,
            SPLIT,
        )
        if not ext.labels:
            check_unlabelled(pred, ext)

        # ---- scores (with labels), QC, outputs -----------------------------------------------
        stage = os.path.join(stage_root, "eval", name)
        os.makedirs(stage)
        writer = MetricWriter(stage)
        try:
            ev = {"domain": name, "split": SPLIT, "role": ROLE}
            rows = dice = None
            if ext.labels:
                # Exactly as a target evaluator: same grid (eval.resolution), same fields.
                res, rows = evaluation.score_split(pred, ext_info, ext_config, ev, step)
                dice = {r["case_id"]: {s: r[s]["dice"] for s in info.structures} for r in rows}
            else:
                res = unscored_result(ev, step, pred, info)
            res |= _external_fields(config, ext, checkpoint)
            choice = (
                choose_on_source_val(workdir, config, info, thresholds)
                if qc_score == "auto"
                else {"score": qc_score, "criterion": "given", "source": []}
            )
            qc_rows = quality.case_qc(pred, ext_info, ext_config)
            res["qc"] = {
                "score": choice["score"],
                "choice": choice,
                "grid": "network",
                "band_pixels": config.eval.boundary_width,
                "fail_dice": thresholds,
            }
            if dice is not None:
                res["qc"]["detection"] = quality.detection_report(
                    qc_rows, dice, choice["score"], thresholds
                )
            outputs = write_native_predictions(
                pred, ext, ext_info, ext_config, os.path.join(stage, PREDICTIONS_DIR)
            )
            size_unit = "mm3" if ext.builder == "prostate" else "pixel"
            review = review_rows(
                qc_rows,
                choice["score"],
                {c: o["size"] for c, o in outputs.items()},
                size_unit,
                info,
                dice,
                thresholds,
            )
            write_review(os.path.join(stage, REVIEW_FILE), review)
            res["review"] = [
                {k: r[k] for k in REVIEW_COLUMNS} for r in review[: config.eval.num_panels]
            ]
            # rows None (no labels): no per_case.csv, no label saved, panels without ground truth.
            evaluation.write_domain_reports(
                stage_root, name, res, rows, pred, ext_info, ext_config, step, writer
            )
            writer.scalars(step, _scalars(name, res))
        finally:
            writer.close()

        # ---- publish: one rename ------------------------------------------------------------
        final = os.path.join(eval_root, name)
        if os.path.exists(final):  # overwrite was allowed by check_name
            os.replace(final, os.path.join(stage_root, "replaced"))
        os.replace(stage, final)
    finally:
        shutil.rmtree(stage_root, ignore_errors=True)
    _print_result(res, final)
    return res


def check_unlabelled(pred: Mapping[str, np.ndarray], ext: ExternalData) -> None:
    """A domain built without labels holds `common.UNLABELLED_MASK_VALUE` in every mask, on the
    network's and on the native grid; anything else is a builder bug that could be scored."""
    masks = [pred["mask"]] + list(pred.get("native_mask", []))
    if not all(np.all(m == common.UNLABELLED_MASK_VALUE) for m in masks):
        raise RuntimeError(f"The unlabelled build of {ext.root} holds masks: a builder bug")


def unscored_result(
    ev: Mapping[str, str], step: int, pred: Mapping[str, np.ndarray], info: DatasetInfo
) -> dict[str, Any]:
    """The summary fields of `evaluation.score_split` that do not need labels, and the note
    that nothing was scored (no 'resolution', 'distance' or 'structures': there are no
    scores)."""
    return {
        "role": ev["role"],
        "domain": ev["domain"],
        "split": ev["split"],
        "step": int(step),
        "num_examples": int(len(pred["case_id"])),
        "num_cases": len(evaluation.group_cases(pred, info.volumetric)),
        "distance_unit": evaluation.distance_unit(pred),
        "note": NO_SCORE_NOTE,
    }


def _external_fields(config, ext: ExternalData, checkpoint: str) -> dict[str, Any]:
    """What a summary of a folder of the user's says beyond an evaluator's fields."""
    return {
        "checkpoint": checkpoint,
        "method": config.method,
        "dataset": config.data.name,
        "data": str(ext.root),
        "layout": ext.layout,
        "center_crop": ext.center_crop,
        "labels": ext.labels,
        "scored": ext.labels,
        "predictions": PREDICTIONS_DIR,
        "predictions_grid": "original",
    }


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _print_result(res: dict, folder: str) -> None:
    head = f"[eval] {res['domain']} (external, {res['num_cases']} cases, checkpoint "
    head += f"{res['checkpoint']} at step {res['step']})"
    if res["scored"]:
        dice = ", ".join(f"{s} {sm['dice']['mean']:.4f}" for s, sm in res["structures"].items())
        print(f"{head}: Dice {dice} (scored on the {res['resolution']} grid)", flush=True)
        det = ", ".join(
            f"{s} AUROC {_fmt(d['auroc'])} ({d['n_fail']}/{d['n']} failing), "
            f"Spearman {_fmt(d['spearman'])}"
            for s, d in res["qc"]["detection"].items()
        )
        print(f"[eval] QC score {res['qc']['score']!r} finds failures: {det}", flush=True)
    else:
        print(f"{head}: {NO_SCORE_NOTE}", flush=True)
    top = ", ".join(f"{r['case_id']} ({r['qc_score']:.3g})" for r in res["review"])
    print(f"[eval] most doubtful ({res['qc']['score']}): {top}", flush=True)
    print(f"[eval] wrote {folder} (review.csv, predictions/)", flush=True)


# ---------------------------------------------------------------------------------------------
# Command line.


def parse_fail_dice(text: str) -> float | dict[str, float]:
    """'0.9' -> 0.9; 'OD=0.9,OC=0.8' -> {'OD': 0.9, 'OC': 0.8}."""
    try:
        if "=" not in text:
            return float(text)
        out = {}
        for part in text.split(","):
            key, value = part.split("=")
            out[key.strip()] = float(value)
        return out
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"--fail_dice {text!r}: expected a number (0.9) or STRUCTURE=VALUE pairs "
            "(OD=0.9,OC=0.8)"
        ) from e


def parse_center_crop(text: str) -> int | None | str:
    """'train' | 'none' | a positive int."""
    if text in ("train", "none"):
        return None if text == "none" else text
    try:
        return int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--center_crop {text!r}: train, none or an int") from e


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line's flags: `evaluate_external`'s arguments, and `verbose`.

    Args:
      argv: command-line arguments (None: sys.argv[1:]).
    """
    parser = argparse.ArgumentParser(
        prog="python -m puseg_jax.evaluate",
        description="Runs a trained workdir's reported checkpoint on a folder of your own (a "
        "hospital the model never saw) and writes W/eval/NAME: scores when there are labels, "
        "predictions and uncertainty maps in your formats on your grid, and review.csv (cases "
        "ranked by a quality-control score, most doubtful first).",
    )
    parser.add_argument("--workdir", required=True, help="a finished training workdir")
    parser.add_argument(
        "--data",
        required=True,
        help="fundus: DIR/test/ROIs/{image,mask} or DIR/{image,mask} (mask optional); "
        "prostate: DIR/<case>.nii.gz [+ <case>_segmentation.nii.gz]",
    )
    parser.add_argument("--name", default=None, help="report name (default: DIR's name)")
    parser.add_argument(
        "--labels",
        default="auto",
        choices=LABELS,
        help="auto: score when masks are there; yes: masks required; no: ignore masks",
    )
    parser.add_argument(
        "--fail_dice",
        type=parse_fail_dice,
        default=quality.DEFAULT_FAIL_DICE,
        help="a case fails below this Dice: 0.9, or per structure OD=0.9,OC=0.8 (default 0.9)",
    )
    parser.add_argument(
        "--qc_score",
        default="auto",
        choices=("auto",) + quality.QC_SCORES,
        help="auto: the score that best finds failures on the run's source validation",
    )
    parser.add_argument(
        "--center_crop",
        type=parse_center_crop,
        default="train",
        help="fundus: train (the crop the model saw), none (whole images) or a side in pixels",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier eval/NAME of this command"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help=f"library log lines on the console too (also {logging_utils.VERBOSE_ENV}=1); "
        f"they are always in W/{logging_utils.LOG_FILE}",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`python -m puseg_jax.evaluate`: flags -> the run's log -> `evaluate_external`.

    Args:
      argv: command-line arguments (None: sys.argv[1:]).

    Returns:
      The written summary.
    """
    args = vars(parse_args(argv))
    verbose = args.pop("verbose") or logging_utils.verbose_from_env()
    # The workdir's log.txt, as a training run's: only in a training workdir, so that a mistyped
    # --workdir stops with its message without becoming a folder.
    if os.path.isfile(os.path.join(args["workdir"], "config.json")):
        # The console as `python -m puseg_jax.main` has it (app.run there): absl's handler on
        # the root logger, its flags at their defaults (this command line is argparse's), INFO
        # to log.txt. A library that logged while this module was imported made absl install
        # `logging.basicConfig`'s stderr handler, which would print every INFO line: removed.
        absl_flags.FLAGS.mark_as_parsed()
        for handler in list(pylogging.root.handlers):
            if type(handler) is pylogging.StreamHandler:
                pylogging.root.removeHandler(handler)
        logging.use_absl_handler()
        logging_utils.setup_run_log(args["workdir"], verbose)
        logging.set_verbosity(logging.INFO)
    return evaluate_external(**args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # The user's mistakes (DataError is a ValueError): the message, not a traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
