"""The photograph branch of `python -m puseg_jax.evaluate` (issue 22): a folder of whole fundus
photographs, each turned into the region the model was trained on and scored on its own grid.

`evaluate_external` calls, in order:

* `decide`: per image, whole photograph or disc-centred region (`photos.is_photograph`, the
  dark-corner cue), or as `--framing=photo|region` says; `announce` prints it (once per folder
  with counts, and per image when the folder is mixed).
* `stage_photographs`: per image the checks (`photo_checks`: unreadable, grey or tiny images and
  masks of another size are skipped with one line each, the others go on), the disc located with
  the run's own model (`localise.locate_disc`, with `photo_predict_fn` around the restored eval
  step and the run's normalisation, at the framing of the run's own training masks:
  `run_framing`), and the region written at its native size (image and mask crop) into a flat
  staging folder that the usual folder builder reads with no centre crop. Regions of a mixed
  folder are staged as the model saw its training regions (the training centre crop).
* `score_and_write`: the region's native probabilities and uncertainty pasted back onto the
  photograph's grid (`photos.paste_back`, 0 outside the region), post-processed by the one
  `scoring.postprocess_case`, scored with the same metrics as every domain (Dice, HD95, ASD in
  photograph pixels) and written as `<case>_pred.png` / `<case>_uncertainty.png` of the
  photograph's size (`writers.write_fundus_case`).
* `review_columns`, `write_photo_panels`, `summary_fields`: the localisation in review.csv
  (doubtful localisations ranked first), the panels (the located region drawn on the
  downscaled photograph beside the region's close-up) and the summary.
"""

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data_builders import common
from puseg_jax import metrics, parallel
from puseg_jax.core.datasets import DatasetInfo
from puseg_jax.data import sources, transforms
from puseg_jax.drawing import panels
from puseg_jax.evaluators import scoring
from puseg_jax.evaluators.records import Predictions
from puseg_jax.external import photo_checks, photos
from puseg_jax.external.folders import ExternalData
from puseg_jax.external.localise import Localisation, locate_disc
from puseg_jax.external.photos import Box, Framing, PhotoDecision
from puseg_jax.external.writers import write_fundus_case

FRAMINGS = ("auto", "photo", "region")

# The longer side of the photograph drawn beside a region's close-up in the panels.
PANEL_PHOTO_SIDE = 360


@dataclasses.dataclass
class PhotoCase:
    """One staged image of a folder of photographs.

    Attributes:
      case_id: its name.
      image: the user's image file (its grid is the outputs').
      shape: (H, W) of the image.
      photograph: whether it was handled as a whole photograph (else as a region).
      box: the region cropped (photograph pixels; may leave the image).
      loc: the localisation (photographs only).
    """

    case_id: str
    image: Path
    shape: tuple[int, int]
    photograph: bool
    box: Box
    loc: Localisation | None = None


def decide(ext: ExternalData, framing: str) -> dict[str, PhotoDecision]:
    """Whole photograph or region, per image of a fundus folder.

    Args:
      ext: the listed folder.
      framing: 'auto' (`photos.is_photograph` on each image), 'photo' or 'region' (forced).

    Returns:
      {case_id: decision}; an unreadable image is decided 'photograph' when forced so, else
      by the cue as far as it can be read (its error comes at staging).
    """
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be one of {FRAMINGS}, got {framing!r}")
    out = {}
    for case_id, path in ext.images.items():
        if framing != "auto":
            out[case_id] = PhotoDecision(framing == "photo", f"--framing={framing}", {})
            continue
        try:
            out[case_id] = photos.is_photograph(photo_checks.read_photo(path))
        except photo_checks.PhotoError as e:
            out[case_id] = PhotoDecision(False, f"unreadable ({e})", {})
    return out


def announce(decisions: Mapping[str, PhotoDecision], framing: str) -> None:
    """Prints what was decided: one line per folder with counts, one per image when mixed."""
    n = len(decisions)
    n_photo = sum(d.is_photograph for d in decisions.values())
    how = "--framing" if framing != "auto" else "decided from the images"
    if n_photo == 0:
        print(f"[eval] framing: {n} of {n} images are regions ({how}): predicted as regions")
        return
    reasons = sorted({d.reason for d in decisions.values() if d.is_photograph})
    why = reasons[0] if len(reasons) == 1 else "per image below"
    print(
        f"[eval] framing: {n_photo} of {n} images are whole photographs ({how}: {why}); the disc "
        "is located in each with the model and the region at the training framing is predicted "
        "(--framing=region resizes them whole)",
        flush=True,
    )
    if 0 < n_photo < n:
        for case_id, d in decisions.items():
            kind = "photograph" if d.is_photograph else "region"
            print(f"[eval]   {case_id}: {kind} ({d.reason})", flush=True)


def run_framing(config: ml_collections.ConfigDict, info: DatasetInfo, data_dir: str) -> Framing:
    """The disc's size in the regions the run was trained on: `photos.training_framing` of the
    masks of its source domains' training split, read from its TFDS data (class indices, after
    the builder's centre crop: what the model saw)."""
    masks = []
    for domain in config.data.source_domains:
        spec = sources.SourceSpec.from_config(
            info, config, domain, config.data.train_split, data_dir
        )
        source = spec.open(decoders={"image": tfds.decode.SkipDecoding()})
        masks += [np.asarray(source[i]["mask"]) for i in range(len(source))]
    return photos.training_framing(masks, convention="classes")


def photo_predict_fn(
    model, config: ml_collections.ConfigDict, info: DatasetInfo, mesh, rng
) -> photos.PredictFn:
    """The restored model as `localise`'s predict function: uint8 regions at the network input
    -> (disc probability, uncertainty), normalised per image as `transforms.preprocess` does for
    evaluation; batches padded to a multiple of the device count."""
    n_dev = mesh.devices.size
    mode = config.data.normalize

    def predict_fn(regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(regions)
        images = np.zeros((-(-n // n_dev) * n_dev, *regions.shape[1:]), np.float32)
        for i, r in enumerate(regions):
            shift, scale = transforms.normalization_stats(r, mode)
            images[i] = (r.astype(np.float32) * np.float32(1 / 255) - shift) / scale
        batch = parallel.shard_batch({"image": images}, mesh, config.parallel.strategy)
        pred = parallel.to_host(model.eval_step(model.state, batch, rng))
        probs = np.asarray(pred["probs"], np.float32)[:n]
        # The disc: the first sigmoid structure, or (softmax) every class but background.
        disc = probs[..., 0] if info.label_mode == "sigmoid" else 1.0 - probs[..., 0]
        return disc, np.asarray(pred["uncertainty"], np.float32)[:n]

    return predict_fn


def region_box(shape: tuple[int, int], crop: int | None) -> Box:
    """A region of a mixed folder as the model saw its training regions: the centred square of
    the training crop (or of the short side when the image is smaller or there is none)."""
    h, w = shape
    side = crop if crop is not None and min(h, w) >= crop else min(h, w)
    return Box((h - side) // 2, (w - side) // 2, side)


def stage_photographs(
    ext: ExternalData,
    decisions: Mapping[str, PhotoDecision],
    predict_fn: photos.PredictFn,
    framing: Framing,
    input_size: int,
    crop: int | None,
    stage_dir: str,
) -> tuple[ExternalData, dict[str, PhotoCase], list[dict[str, str]]]:
    """Checks, locates and crops every image into a flat folder the folder builder reads.

    Args:
      ext: the user's folder (listed with no centre crop).
      decisions: `decide`'s.
      predict_fn: the model (`photo_predict_fn`).
      framing: the run's training framing.
      input_size: the network input side.
      crop: the training centre crop (regions of a mixed folder).
      stage_dir: an empty folder; `<stage_dir>/<folder name>/{image,mask}` is written.

    Returns:
      (the staged folder as `ExternalData` with no centre crop, {case_id: `PhotoCase`},
      [{'case_id', 'kind', 'message'}] of the images skipped).

    Raises:
      DataError: no image could be staged.
    """
    root = Path(stage_dir) / ext.root.name
    (root / "image").mkdir(parents=True)
    if ext.labels:
        (root / "mask").mkdir()
    print(f"[eval] training framing: {framing.describe()}", flush=True)
    cases, skipped, staged = {}, [], {}
    for case_id, path in ext.images.items():
        try:
            photo = photo_checks.check_photo(photo_checks.read_photo(path), input_size, case_id)
            mask = None
            if ext.labels:
                mask_path = common.list_by_stem(ext.root / "mask")[case_id]
                mask = photo_checks.check_mask(
                    photo_checks.read_mask(mask_path), photo.shape, case_id
                )
            loc = None
            if decisions[case_id].is_photograph:
                loc = locate_disc(photo, predict_fn, framing, input_size, name=case_id)
                print(
                    f"[eval] {case_id}: {loc.message()} ({loc.n_windows} windows, "
                    f"{loc.seconds:.1f} s)",
                    flush=True,
                )
                if loc.box is None:
                    raise photo_checks.PhotoError("no_disc", loc.flags["no_disc"], case_id)
                box = loc.box
            else:
                box = region_box(photo.shape[:2], crop)
        except photo_checks.PhotoError as e:
            print(f"[eval] {case_id}: skipped ({e.kind}): {e}", flush=True)
            skipped.append({"case_id": case_id, "kind": e.kind, "message": str(e)})
            continue
        target = root / "image" / f"{case_id}.png"
        Image.fromarray(photos.crop_region(photo, box)).save(target)
        if mask is not None:
            region_mask = photos.crop_region(mask, box, pad_value=255, nearest=True)
            Image.fromarray(region_mask, "L").save(root / "mask" / f"{case_id}.png")
        staged[case_id] = target
        shape = (int(photo.shape[0]), int(photo.shape[1]))
        cases[case_id] = PhotoCase(case_id, path, shape, loc is not None, box, loc)
    if not staged:
        raise common.DataError(
            f"No image of {ext.root} could be evaluated ({len(skipped)} skipped, see above)"
        )
    return dataclasses.replace(ext, root=root, images=staged, center_crop=None), cases, skipped


def photo_grid(
    pred: Predictions,
    idx: np.ndarray,
    case: PhotoCase,
    info: DatasetInfo,
    config: ml_collections.ConfigDict,
) -> tuple[np.ndarray, np.ndarray]:
    """A case's post-processed masks [S, H, W] and uncertainty [H, W] on the photograph's grid:
    the region's native probabilities pasted back (0 outside the region), then
    `scoring.postprocess_case`."""
    probs = photos.paste_back(scoring.native_probs(pred, idx)[0], case.box, case.shape)
    unc = photos.paste_back(
        scoring.native_probs(pred, idx, key="uncertainty")[0], case.box, case.shape
    )
    pm = scoring.postprocess_case(probs[None], info, config)[:, 0]
    return pm, np.clip(unc, 0.0, 1.0)


def score_and_write(
    pred: Predictions,
    cases: Mapping[str, PhotoCase],
    masks_dir: Path | None,
    info: DatasetInfo,
    config: ml_collections.ConfigDict,
    out_dir: str,
) -> tuple[list[dict[str, Any]] | None, dict[str, dict[str, Any]]]:
    """Scores every case on its photograph's grid (with labels) and writes its prediction and
    uncertainty PNGs at the photograph's size, one case at a time (a photograph's maps are
    large).

    Args:
      pred: `predict_split` of the staged regions.
      cases: `stage_photographs`' cases.
      masks_dir: the user's mask folder (None: no labels).
      info: the family.
      config: the run's config (post-processing).
      out_dir: the predictions folder.

    Returns:
      (rows as `scoring.score_cases` rows, on the photograph's grid in its pixels, or None
      without labels; {case_id: {'files', 'size'}} as `writers.write_native_predictions`).
    """
    os.makedirs(out_dir, exist_ok=True)
    mask_files = common.list_by_stem(masks_dir) if masks_dir is not None else {}
    rows, outputs = [], {}
    for case_id, idx in scoring.group_cases(pred, info.volumetric):
        case = cases[case_id]
        pm, unc = photo_grid(pred, idx, case, info, config)
        outputs[case_id] = write_fundus_case(pm, unc, case.image, None, info, out_dir, case_id)
        if masks_dir is None:
            continue
        mask = photo_checks.check_mask(
            photo_checks.read_mask(mask_files[case_id]), case.shape, case_id
        )
        gt = scoring.gt_structures(photo_checks.release_to_classes(mask), info)
        row: dict[str, Any] = {"case_id": case_id, "num_slices": 1}
        for s, name in enumerate(info.structures):
            row[name] = metrics.compute_case_metrics(pm[s], gt[s], np.ones(2))
        rows.append(row)
    return (rows if masks_dir is not None else None), outputs


def scored_result(
    pred: Predictions,
    rows: list[dict[str, Any]],
    info: DatasetInfo,
    config: ml_collections.ConfigDict,
    ev: Mapping[str, str],
    step: int,
) -> dict[str, Any]:
    """The summary fields of `scoring.score_split` for cases scored on their photographs' grids
    (the uncertainty quality on the regions' native grid, as the region path does)."""
    summary = metrics.summarize_cases(rows, scoring.SURFACE_METRICS)
    return {
        "role": ev["role"],
        "domain": ev["domain"],
        "split": ev["split"],
        "step": int(step),
        "num_examples": int(len(pred.case_id)),
        "num_cases": len(rows),
        "resolution": "native",
        "distance_unit": "pixel",
        "distance": "2-D, pixels of each whole photograph",
        "structures": summary,
        "uncertainty_resolution": "native region",
        "uncertainty": scoring.uncertainty_quality(
            pred, info, config.eval.boundary_width, "native"
        ),
    }


def review_columns(
    cases: Mapping[str, PhotoCase],
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """review.csv's localisation columns per case (`Localisation.as_row()`, and 'framing') and
    the doubtful localisations ({case_id: flags}) that `qc.review_rows` ranks first."""
    extra, doubtful = {}, {}
    for c, case in cases.items():
        extra[c] = {"framing": "photograph" if case.photograph else "region"}
        if case.loc is not None:
            extra[c] |= case.loc.as_row()
            if case.loc.flags:
                doubtful[c] = "|".join(case.loc.flags)
    return extra, doubtful


def write_photo_panels(
    folder: str, cases: Mapping[str, PhotoCase], pred: Predictions, num_panels: int
) -> None:
    """Replaces each photograph's `panel_<i>_<case>.png` (the region's close-up, as
    `case_panels` draws every domain) by the downscaled photograph with the located region
    drawn, beside that close-up."""
    for i, (case_id, _) in enumerate(scoring.group_cases(pred, False)[:num_panels]):
        case = cases[case_id]
        path = os.path.join(folder, f"panel_{i}_{case_id}.png")
        if not case.photograph or not os.path.isfile(path):
            continue
        with Image.open(path) as im:
            close_up = np.asarray(im.convert("RGB"))
        with Image.open(case.image) as im:
            scale = min(1.0, PANEL_PHOTO_SIDE / max(im.size), close_up.shape[0] / im.size[1])
            size = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
            small = np.asarray(im.convert("RGB").resize(size, Image.BILINEAR))
        b = case.box
        drawn = panels.draw_box(
            small, round(b.top * scale), round(b.left * scale), max(2, round(b.side * scale))
        )
        panels.save_png(panels.side_by_side(drawn, close_up), path)


def summary_fields(
    cases: Mapping[str, PhotoCase],
    decisions: Mapping[str, PhotoDecision],
    skipped: list[dict[str, str]],
    framing: Framing,
    framing_flag: str,
) -> dict[str, Any]:
    """What summary.json says of a folder of photographs: the training framing, each image's
    decision and localisation, and the images skipped with why."""
    return {
        "photographs": {
            "framing_flag": framing_flag,
            "training_framing": dataclasses.asdict(framing),
            "cases": {
                c: {
                    "photograph": case.photograph,
                    "reason": decisions[c].reason,
                    "box": list(case.box.as_tuple()),
                    **({} if case.loc is None else case.loc.as_row()),
                    **({} if case.loc is None else {"seconds": round(case.loc.seconds, 2)}),
                }
                for c, case in cases.items()
            },
            "skipped": skipped,
        }
    }
