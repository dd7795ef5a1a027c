"""A trained run on a new hospital: restore the reported checkpoint, predict, score when
labelled, write the reports (`evaluate_external`)."""

import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from data_builders import common
from puseg_jax import parallel
from puseg_jax.core.datasets import DatasetInfo
from puseg_jax.core.formatting import number
from puseg_jax.core.logging_utils import MetricWriter
from puseg_jax.data import prepare
from puseg_jax.evaluators import domains, predict, quality, reports, scoring
from puseg_jax.evaluators.records import Predictions
from puseg_jax.external import photo_eval
from puseg_jax.external.folders import (
    DOMAIN,
    ROLE,
    SPLIT,
    ExternalData,
    find_external_data,
    folder_builder,
    prepare_external,
    training_center_crop,
)
from puseg_jax.external.qc import (
    REVIEW_COLUMNS,
    REVIEW_FILE,
    choose_on_source_val,
    review_rows,
    write_review,
)
from puseg_jax.external.writers import PREDICTIONS_DIR, write_native_predictions
from puseg_jax.runs.run_folder import RunFolder, open_run
from puseg_jax.train import config as train_config
from puseg_jax.train.restore import restore_for_inference

NO_SCORE_NOTE = "No labels: predictions and uncertainty maps were written, no score was computed."

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# ---------------------------------------------------------------------------------------------
# The run: config, name of the report.


def load_run_config(run: str | RunFolder) -> ml_collections.ConfigDict:
    """The config a workdir (or its `RunFolder`) was trained with, checked: its dataset family
    must have a folder builder."""
    config = open_run(run).load_config(announce="[eval]")
    folder_builder(config.data.name)
    return config


def check_name(workdir: str, config: ml_collections.ConfigDict, name: str, overwrite: bool) -> None:
    """Refuses a report name that is not a plain folder name, that an evaluator of the run owns,
    or that exists already (unless `overwrite`)."""
    if not _NAME.match(name):
        raise ValueError(
            f"--name {name!r}: use letters, digits, '_', '.' and '-', starting with a letter or "
            "digit"
        )
    evals = train_config.resolve_evals(config)
    if name in evals:
        raise ValueError(
            f"--name {name!r} is an evaluator of {workdir} (role {evals[name]['role']}); its "
            "report would be overwritten. Pick another --name."
        )
    target = os.path.join(workdir, "eval", name)
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")


# ---------------------------------------------------------------------------------------------
# Reports.


def _scalars(name: str, res: dict) -> dict[str, float]:
    """The report's scalars for TensorBoard: an evaluator's (`domains.eval_scalars`) and the QC
    detection's; undefined ones (e.g. an AUROC without failures) left out."""
    out = domains.eval_scalars(name, res)
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
    framing: str = "auto",
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
      framing: fundus only: 'auto' (whole photographs or regions, decided per image), 'photo'
        (locate the disc in every image first: `photo_eval`) or 'region' (as released).

    Returns:
      The written summary.json content.
    """
    # ---- checks, before anything is built or compiled -------------------------------------
    workdir = os.path.abspath(workdir)
    run = RunFolder(workdir)
    config = load_run_config(run)
    info = train_config.validate_config(config)
    which, step, checkpoint = run.reported_checkpoint()
    name = name or Path(data).expanduser().resolve().name
    check_name(workdir, config, name, overwrite)
    if qc_score != "auto" and qc_score not in quality.QC_SCORES:
        raise ValueError(f"qc_score must be 'auto' or one of {quality.QC_SCORES}, got {qc_score!r}")
    thresholds = quality.fail_thresholds(fail_dice, info.structures)
    crop = training_center_crop(config) if center_crop == "train" else center_crop
    if crop is not None and (not isinstance(crop, int) or crop < 1):
        raise ValueError(f"center_crop must be 'train', None or a positive int, got {crop!r}")
    decisions = None
    if folder_builder(config.data.name) == "fundus" and framing != "region":
        listed = find_external_data(data, config.data.name, labels, None)
        decisions = photo_eval.decide(listed, framing)
        photo_eval.announce(decisions, framing)
        if not any(d.is_photograph for d in decisions.values()):
            decisions = None
    elif framing not in photo_eval.FRAMINGS:
        raise ValueError(f"framing must be one of {photo_eval.FRAMINGS}, got {framing!r}")
    # Photographs: listed whole (their regions are cropped at the training framing later).
    ext = (
        listed
        if decisions is not None
        else find_external_data(data, config.data.name, labels, crop)
    )
    user_ext = ext

    eval_root = os.path.join(workdir, "eval")
    os.makedirs(eval_root, exist_ok=True)
    stage_root = tempfile.mkdtemp(prefix=f".partial-{name}-", dir=eval_root)
    try:
        mesh = parallel.create_mesh(config.parallel.num_devices)
        _, _, eval_rng = jax.random.split(jax.random.key(config.seed), 3)
        model = None

        # ---- photographs: locate the disc, stage the regions ---------------------------------
        if decisions is not None:
            # The model finds the disc, so it is restored before the build here; for regions
            # the build's checks of the user's files come first (a bad folder fails fast).
            model = restore_for_inference(config, info, workdir, mesh, which=which, step=step)
            run_framing = photo_eval.run_framing(config, info, prepare.resolve_data_dir(config))
            predict_fn = photo_eval.photo_predict_fn(model, config, info, mesh, eval_rng)
            ext, cases, skipped = photo_eval.stage_photographs(
                ext,
                decisions,
                predict_fn,
                run_framing,
                int(config.data.image_size),
                crop,
                os.path.join(stage_root, "photos"),
            )

        # ---- build the folder as a test-only domain ------------------------------------------
        options = config.data.get("builder_options")
        options = options.to_dict() if options else {}
        ext_info, ext_config = prepare_external(
            ext, info, config, os.path.join(stage_root, "tfds"), options
        )

        # ---- predict with the reported checkpoint --------------------------------------------
        if model is None:
            model = restore_for_inference(config, info, workdir, mesh, which=which, step=step)
        n_dev = mesh.devices.size
        # Any device count: the batch is padded anyway, so round it up to a multiple.
        ext_config.eval.batch_size = -(-int(config.eval.batch_size) // n_dev) * n_dev
        pred = predict.predict_split(
            p_eval_step=model.eval_step,
            state=model.state,
            rng=eval_rng,
            config=ext_config,
            info=ext_info,
            data_dir=ext_config.data.data_dir,
            mesh=mesh,
            strategy=config.parallel.strategy,
            domain=DOMAIN,
            split=SPLIT,
        )
        if not ext.labels:
            check_unlabelled(pred, ext)

        # ---- scores (with labels), QC, outputs -----------------------------------------------
        stage = os.path.join(stage_root, "eval", name)
        os.makedirs(stage)
        writer = MetricWriter(stage)
        try:
            ev = {"domain": name, "split": SPLIT, "role": ROLE}
            rows = dice = outputs = None
            if decisions is not None:
                # Scored and written on each whole photograph's grid.
                rows, outputs = photo_eval.score_and_write(
                    pred,
                    cases,
                    user_ext.root / "mask" if ext.labels else None,
                    ext_info,
                    ext_config,
                    os.path.join(stage, PREDICTIONS_DIR),
                )
                res = (
                    photo_eval.scored_result(pred, rows, ext_info, ext_config, ev, step)
                    if ext.labels
                    else unscored_result(ev, step, pred, info)
                )
                if rows is not None:
                    dice = {r["case_id"]: {s: r[s]["dice"] for s in info.structures} for r in rows}
            elif ext.labels:
                # Exactly as a target evaluator: same grid (eval.resolution), same fields.
                res, rows = scoring.score_split(pred, ext_info, ext_config, ev, step)
                dice = {r["case_id"]: {s: r[s]["dice"] for s in info.structures} for r in rows}
            else:
                res = unscored_result(ev, step, pred, info)
            res |= _external_fields(config, user_ext, checkpoint)
            extra = doubtful = None
            if decisions is not None:
                res |= photo_eval.summary_fields(cases, decisions, skipped, run_framing, framing)
                extra, doubtful = photo_eval.review_columns(cases)
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
            if outputs is None:
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
                extra,
                doubtful,
            )
            write_review(os.path.join(stage, REVIEW_FILE), review)
            res["review"] = [
                {k: r[k] for k in REVIEW_COLUMNS} for r in review[: config.eval.num_panels]
            ]
            # rows None (no labels): no per_case.csv, no label saved, panels without ground truth.
            reports.write_domain_reports(
                stage_root, name, res, rows, pred, ext_info, ext_config, step, writer
            )
            if decisions is not None:
                photo_eval.write_photo_panels(stage, cases, pred, config.eval.num_panels)
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


def check_unlabelled(pred: Predictions, ext: ExternalData) -> None:
    """A domain built without labels holds `common.UNLABELLED_MASK_VALUE` in every mask, on the
    network's and on the native grid; anything else is a builder bug that could be scored."""
    native = [] if pred.native_label is None else list(pred.native_label)
    masks = [pred.label] + native
    if not all(np.all(m == common.UNLABELLED_MASK_VALUE) for m in masks):
        raise RuntimeError(f"The unlabelled build of {ext.root} holds masks: a builder bug")


def unscored_result(
    ev: Mapping[str, str], step: int, pred: Predictions, info: DatasetInfo
) -> dict[str, Any]:
    """The summary fields of `scoring.score_split` that do not need labels, and the note
    that nothing was scored (no 'resolution', 'distance' or 'structures': there are no
    scores)."""
    return {
        "role": ev["role"],
        "domain": ev["domain"],
        "split": ev["split"],
        "step": int(step),
        "num_examples": int(len(pred.case_id)),
        "num_cases": len(scoring.group_cases(pred, info.volumetric)),
        "distance_unit": scoring.distance_unit(pred),
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


def _print_result(res: dict, folder: str) -> None:
    head = f"[eval] {res['domain']} (external, {res['num_cases']} cases, checkpoint "
    head += f"{res['checkpoint']} at step {res['step']})"
    if res["scored"]:
        dice = ", ".join(f"{s} {sm['dice']['mean']:.4f}" for s, sm in res["structures"].items())
        grid = "each photograph's" if "photographs" in res else f"the {res['resolution']}"
        print(f"{head}: Dice {dice} (scored on {grid} grid)", flush=True)
        det = ", ".join(
            f"{s} AUROC {number(d['auroc'])} ({d['n_fail']}/{d['n']} failing), "
            f"Spearman {number(d['spearman'])}"
            for s, d in res["qc"]["detection"].items()
        )
        print(f"[eval] QC score {res['qc']['score']!r} finds failures: {det}", flush=True)
    else:
        print(f"{head}: {NO_SCORE_NOTE}", flush=True)
    top = ", ".join(f"{r['case_id']} ({r['qc_score']:.3g})" for r in res["review"])
    print(f"[eval] most doubtful ({res['qc']['score']}): {top}", flush=True)
    print(f"[eval] wrote {folder} (review.csv, predictions/)", flush=True)
