"""Predictions on the original grid in the user's own formats: PNG for fundus images, NIfTI
for volumes."""

import os
from pathlib import Path
from typing import Any

import ml_collections
import nibabel as nib
import numpy as np
from PIL import Image

from data_builders.fundus import fundus
from data_builders.prostate import prostate
from puseg_jax.core.datasets import DatasetInfo
from puseg_jax.evaluators import scoring
from puseg_jax.evaluators.records import Predictions
from puseg_jax.external.folders import ExternalData

PREDICTIONS_DIR = "predictions"

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
    pred: Predictions,
    idx: np.ndarray,
    info: DatasetInfo,
    config: ml_collections.ConfigDict,
) -> tuple[np.ndarray, np.ndarray]:
    """One case's post-processed prediction and uncertainty on its native grid.

    The probabilities are those native scoring thresholds (`scoring.native_probs`: bilinear
    from the network's grid to the builder's native grid, the released image after the centre
    crop or the volume's own slices), post-processed by `scoring.postprocess_case` as scoring
    does; the uncertainty map is resampled the same way, as `uncertainty_quality` does.

    Returns:
      (structure masks [S, D, H, W] bool, uncertainty [D, H, W] float32 in [0, 1]), D = 1 for
      an image.
    """
    pm = scoring.postprocess_case(scoring.native_probs(pred, idx), info, config)
    unc = np.clip(scoring.native_probs(pred, idx, key="uncertainty"), 0.0, 1.0)
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
    pred: Predictions,
    ext: ExternalData,
    info: DatasetInfo,
    config: ml_collections.ConfigDict,
    out_dir: str,
) -> dict[str, dict[str, Any]]:
    """Every case's prediction and uncertainty in the user's format, on the original grid.

    Args:
      pred: `predict.predict_split` output of the external domain (`native_shape` per
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
    for case_id, idx in scoring.group_cases(pred, info.volumetric):
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
