"""`python -m puseg_jax.evaluate`: a trained model on a folder of a hospital it never saw.

The end-to-end tests reuse the session's `tiny_workdir` (synthetic fundus, whose label convention
the real fundus folders share) on a renamed copy of a real fundus domain without its `train/`
folder; the NIfTI tests replace the model by a perfect predictor to check that predictions land
on the input's own voxel grid.
"""

import csv
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import test_config
from PIL import Image

from data_builders import common
from data_builders.fundus import fundus_builder
from data_builders.prostate import prostate_builder
from puseg_jax.evaluators.records import Predictions

FUNDUS_VALUES = {0, 128, 255}


def _json(path):
    with open(path) as f:
        return json.load(f, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _copy_workdir(tiny_workdir, tmp_path) -> str:
    workdir = str(tmp_path / "run")
    shutil.copytree(tiny_workdir, workdir)
    return workdir


def _hospital(shared_data, tmp_path, domain="Domain4", name="Hospital4") -> Path:
    """A renamed copy of a real fundus domain with its train/ folder removed."""
    root = tmp_path / "user" / name
    shutil.copytree(shared_data / "fundus" / domain / "test", root / "test")
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return root


def _fake_workdir(tmp_path, family="fundus", step=7, **overrides) -> str:
    """config.json, summary.json and an (empty) checkpoint folder: enough for every check that
    runs before the model is restored."""
    from puseg_jax.train import config as train_config

    if family in ("prostate", "prostate_slices"):
        overrides = {
            "data.source_domains": ("RUNMC", "BMC"),
            "data.target_domains": ("BIDMC",),
            **overrides,
        }
    config = test_config(**{"data.name": family, **overrides})
    workdir = tmp_path / f"fake_{family}"
    (workdir / "checkpoints" / "last" / str(step)).mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(train_config._config_json(config)))
    (workdir / "summary.json").write_text(json.dumps({"checkpoint": "last", "step": step}))
    return str(workdir)


def _cli(argv) -> dict:
    """`python -m puseg_jax.evaluate`'s `main`: its flags, its run log (undone at its end)."""
    import sys

    from puseg_jax import evaluate

    stdout = sys.stdout
    try:
        return evaluate.main(argv)
    finally:
        assert sys.stdout is stdout  # the console is the test's again


def _dice(a, b) -> float:
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def _no_partial(workdir) -> None:
    left = [d for d in os.listdir(os.path.join(workdir, "eval")) if d.startswith(".partial")]
    assert not left, left


# ---------------------------------------------------------------------------------------------
# Builders: test-only and unlabelled domains.


def test_fundus_flat_and_unlabelled_builds(tmp_path):
    manual = tmp_path / "manual"
    for kind in ("image", "mask"):
        (manual / "Flat" / kind).mkdir(parents=True)
    for case in ("a", "b"):
        image = np.full((10, 12, 3), 40, np.uint8)
        Image.fromarray(image).save(manual / "Flat" / "image" / f"{case}.png")
        mask = np.full((10, 12), 255, np.uint8)
        mask[3:7, 3:8], mask[4:6, 4:6] = 128, 0
        Image.fromarray(mask).save(manual / "Flat" / "mask" / f"{case}.png")
    import tensorflow_datasets as tfds

    def build(builder):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual)),
            file_format="array_record",
        )
        return builder.as_data_source()

    flat = build(
        fundus_builder(
            "Flat", tmp_path / "d", center_crop=None, splits=("test",), layout="flat", name="F1"
        )
    )
    assert set(flat) == {"test"} and len(flat["test"]) == 2
    assert set(np.unique(flat["test"][0]["mask"])) == {0, 1, 2}
    bare = build(
        fundus_builder(
            "Flat",
            tmp_path / "d",
            center_crop=None,
            splits=("test",),
            layout="flat",
            labels=False,
            name="F2",
        )
    )
    mask = bare["test"][1]["mask"]
    assert mask.shape == (10, 12, 1) and np.all(mask == common.UNLABELLED_MASK_VALUE)
    with pytest.raises(ValueError, match="one split"):
        fundus_builder("Flat", tmp_path / "d", layout="flat", name="F3")
    with pytest.raises(ValueError, match="layout"):
        fundus_builder("Flat", tmp_path / "d", layout="nested", name="F4")


def test_prostate_test_only_site_with_and_without_labels(tmp_path):
    import tensorflow_datasets as tfds

    site = tmp_path / "manual" / "Clinic"
    site.mkdir(parents=True)
    for case in ("Case00", "Case01", "Case02"):
        label = np.zeros((6, 6, 2), np.uint8)
        label[1:4, 2:5] = 1
        volume = np.random.rand(6, 6, 2).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), site / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), site / f"{case}_segmentation.nii.gz")
    for labels in (True, False):
        builder = prostate_builder(
            "Clinic", tmp_path / "d", name=f"ext_{labels}", splits=("test",), labels=labels
        )
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(site.parent)),
            file_format="array_record",
        )
        source = builder.as_data_source()
        assert set(source) == {"test"}  # every case in the one split, no patient split
        assert len(source["test"]) == 3 * 2
        masks = np.stack([source["test"][i]["mask"] for i in range(6)])
        native = np.stack([source["test"][i]["native_mask"] for i in range(6)])
        assert native.shape == (6, 6, 6, 1)  # the volume's own slices
        if labels:
            assert set(np.unique(masks)) == set(np.unique(native)) == {0, 1}
        else:
            assert np.all(masks == common.UNLABELLED_MASK_VALUE)
            assert np.all(native == common.UNLABELLED_MASK_VALUE)
    with pytest.raises(ValueError, match="one split name"):
        prostate_builder("Clinic", tmp_path / "d", name="bad", splits=("a", "b"))


# ---------------------------------------------------------------------------------------------
# Quality control.


def test_qc_scores_on_a_constructed_case():
    from puseg_jax.evaluators import quality

    pm = np.zeros((2, 12, 12), bool)
    pm[0, 2:10, 2:10] = True  # 8x8 predicted
    u = np.zeros((12, 12))
    u[2:10, 2:10] = 0.5
    s = quality.structure_qc_scores(pm, u, band=1)
    assert s["image_mean"] == [pytest.approx(32 / 144)] * 2
    # Band 1: the 8x8 square plus its 4-neighbour ring (32 pixels, U = 0): 96 pixels, sum 32.
    assert s["region_mean"][0] == pytest.approx(32 / 96)
    # Boundary band: the square's 28 edge pixels (U = 0.5) and the 32 outside (U = 0).
    assert s["boundary_mean"][0] == pytest.approx(14 / 60)
    assert s["region_per_area"][0] == pytest.approx(32 / 64)
    # An empty prediction has no region: the most doubtful.
    assert [s[k][1] for k in quality.QC_SCORES[1:]] == [np.inf] * 3
    everywhere = quality.structure_qc_scores(np.ones((1, 4, 4), bool), np.full((4, 4), 0.2), 1)
    assert everywhere["boundary_mean"] == [np.inf]
    assert everywhere["region_mean"] == [pytest.approx(0.2)]


def test_detection_quality_and_the_choice_on_given_cases():
    from puseg_jax.evaluators import quality

    d = quality.detection_quality([0.9, 0.8, 0.1, 0.2], [0.5, 0.6, 0.95, 0.92], 0.9)
    assert d == {"n": 4, "n_fail": 2, "auroc": 1.0, "spearman": -1.0}
    d = quality.detection_quality([0.1, 0.2, 0.9, np.inf], [0.5, 0.6, 0.95, 0.92], 0.9)
    assert d["auroc"] == 0.0 and d["spearman"] == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    # No failing case: AUROC undefined; constant Dice: Spearman undefined.
    d = quality.detection_quality([0.1, 0.2], [0.95, 0.95], 0.9)
    assert np.isnan(d["auroc"]) and np.isnan(d["spearman"])

    dice = {"a": {"OD": 0.95}, "b": {"OD": 0.5}, "c": {"OD": 0.93}, "d": {"OD": 0.7}}
    good = {"a": 0.1, "b": 0.9, "c": 0.2, "d": 0.8}  # separates the failures
    bad = {"a": 0.9, "b": 0.1, "c": 0.8, "d": 0.2}
    rows = [
        {
            "case_id": c,
            "scores": {
                "image_mean": {"OD": bad[c]},
                "region_mean": {"OD": good[c]},
                "boundary_mean": {"OD": bad[c]},
                "region_per_area": {"OD": 0.5},
            },
        }
        for c in dice
    ]
    choice = quality.choose_qc_score(rows, dice, {"OD": 0.9})
    assert (choice["score"], choice["criterion"]) == ("region_mean", "auroc")
    # Nothing fails at 0.4: Spearman decides (still the score that falls as Dice rises).
    choice = quality.choose_qc_score(rows, dice, {"OD": 0.4})
    assert (choice["score"], choice["criterion"]) == ("region_mean", "spearman")
    one = quality.choose_qc_score(rows[:1], {"a": dice["a"]}, {"OD": 0.9})
    assert (one["score"], one["criterion"]) == (quality.FALLBACK_QC_SCORE, "fallback")


def test_fail_thresholds_and_review_order():
    from puseg_jax import evaluate
    from puseg_jax.core.datasets import get_dataset_info
    from puseg_jax.evaluators import quality
    from puseg_jax.external import qc as external_qc

    assert quality.fail_thresholds(0.8, ("OD", "OC")) == {"OD": 0.8, "OC": 0.8}
    assert quality.fail_thresholds({"OD": 0.9, "OC": 0.7}, ("OD", "OC")) == {"OD": 0.9, "OC": 0.7}
    with pytest.raises(ValueError, match="missing"):
        quality.fail_thresholds({"OD": 0.9}, ("OD", "OC"))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        quality.fail_thresholds(1.5, ("OD",))
    assert evaluate.parse_fail_dice("OD=0.9,OC=0.8") == {"OD": 0.9, "OC": 0.8}

    info = get_dataset_info("fundus")
    qc = [
        {"case_id": c, "scores": {"region_mean": {"OD": od, "OC": oc}}}
        for c, od, oc in (("a", 0.2, 0.3), ("b", 0.1, np.inf), ("c", 0.5, 0.1))
    ]
    sizes = {c: {"OD": 10, "OC": 2} for c in "abc"}
    dice = {"a": {"OD": 0.95, "OC": 0.85}, "b": {"OD": 0.9, "OC": 0.0}, "c": {"OD": 0.7, "OC": 0.9}}
    rows = external_qc.review_rows(
        qc, "region_mean", sizes, "pixel", info, dice, {"OD": 0.9, "OC": 0.8}
    )
    assert [r["case_id"] for r in rows] == ["b", "c", "a"]  # an empty cup first
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert [r["fails"] for r in rows] == [True, True, False]
    assert rows[1]["qc_score"] == 0.5 and rows[0]["dice_OC"] == 0.0
    # The empty cup is ranked first by name, its case score is its disc's (never inf).
    assert rows[0]["no_prediction"] == "OC" and rows[0]["qc_score"] == 0.1
    assert [r["no_prediction"] for r in rows[1:]] == ["", ""]
    # A doubt (a photograph's localisation) ranks before an empty prediction.
    rows = external_qc.review_rows(
        qc, "region_mean", sizes, "pixel", info, None, {}, doubtful={"a": "at_edge"}
    )
    assert [r["case_id"] for r in rows] == ["a", "b", "c"]
    assert external_qc.finite_case_score({"OD": np.inf, "OC": np.inf}, 0.3) == 0.3
    assert external_qc.finite_case_score({"OD": np.inf, "OC": np.inf}) == 1.0


# ---------------------------------------------------------------------------------------------
# End to end, with the session's trained workdir.


def test_new_fundus_hospital_from_the_command_line(tiny_workdir, shared_data, tmp_path):
    from puseg_jax.evaluators import quality

    workdir = _copy_workdir(tiny_workdir, tmp_path)
    hospital = _hospital(shared_data, tmp_path)
    run_summary = _json(os.path.join(workdir, "summary.json"))
    # The QC score is chosen on source validation: the target's predictions are never read.
    os.remove(os.path.join(workdir, "eval", "Domain3", "predictions.npz"))
    log_path = Path(workdir, "log.txt")  # none yet: the session's run was trained in-process
    log_before = log_path.read_text() if log_path.exists() else ""
    res = _cli(["--workdir", workdir, "--data", str(hospital), "--fail_dice=0.8"])
    # The command's lines are appended to the run's log.txt, under a header naming it.
    log = log_path.read_text()
    assert log.startswith(log_before)
    added = log[len(log_before) :]
    assert added.count("\n==== ") == 1
    assert "[eval] wrote " in added and "[prepare] Hospital4: " in added

    out = os.path.join(workdir, "eval", "Hospital4")
    summary = _json(os.path.join(out, "summary.json"))
    assert summary["domain"] == "Hospital4"
    assert summary["role"] == "external" and summary["scored"] and summary["labels"]
    assert summary["checkpoint"] == run_summary["checkpoint"]
    assert summary["step"] == run_summary["step"] == res["step"]
    assert summary["num_cases"] == 3 and summary["layout"] == "dofe"
    assert {"OD", "OC"} == set(summary["structures"])
    assert {"ece", "auroc_error"} <= set(summary["uncertainty"])
    # Scored as the run's target evaluator is: same grid, same description of the distances.
    target = _json(os.path.join(workdir, "eval", "Domain3", "summary.json"))
    for key in ("resolution", "distance", "uncertainty_resolution", "distance_unit"):
        assert summary[key] == target[key], key
    assert summary["resolution"] == "native"
    # The QC score was chosen on the run's source-validation evaluators, never its target.
    qc = summary["qc"]
    assert qc["choice"]["source"] == ["Domain1", "Domain2"] and qc["score"] in quality.QC_SCORES
    assert set(qc["detection"]) == {"OD", "OC", "any"} and qc["fail_dice"] == {"OD": 0.8, "OC": 0.8}
    per_case = _csv(os.path.join(out, "per_case.csv"))
    assert len(per_case) == 6
    review = _csv(os.path.join(out, "review.csv"))
    names = sorted(p.stem for p in (hospital / "test/ROIs/image").iterdir())
    assert sorted(r["case_id"] for r in review) == names
    scores = [float(r["qc_score"]) for r in review]
    assert scores == sorted(scores, reverse=True)
    dice = {(r["case_id"], r["structure"]): float(r["dice"]) for r in per_case}
    for r in review:
        assert float(r["dice_OD"]) == pytest.approx(dice[(r["case_id"], "OD")])
    assert os.path.isfile(os.path.join(out, "predictions.npz"))
    assert any(f.startswith("panel_0_") for f in os.listdir(out))
    # Predictions in the release's convention, of each image's size.
    for case in names:
        size = Image.open(hospital / "test/ROIs/image" / f"{case}.png").size
        mask = Image.open(os.path.join(out, "predictions", f"{case}_pred.png"))
        unc = Image.open(os.path.join(out, "predictions", f"{case}_uncertainty.png"))
        assert mask.size == unc.size == size and mask.mode == unc.mode == "L"
        assert set(np.unique(np.asarray(mask))) <= FUNDUS_VALUES
        row = next(r for r in review if r["case_id"] == case)
        assert int(row["predicted_OD"]) == int((np.asarray(mask) < 255).sum())
        # The written mask is the scored prediction: against the user's own mask file it has
        # the Dice of per_case.csv (scored natively, on the image's grid: no crop here).
        gt = np.asarray(Image.open(hospital / "test/ROIs/mask" / f"{case}.png").convert("L"))
        written = np.asarray(mask)
        assert _dice(written < 255, gt < 255) == pytest.approx(dice[(case, "OD")], abs=1e-12)
        assert _dice(written == 0, gt == 0) == pytest.approx(dice[(case, "OC")], abs=1e-12)
    _no_partial(workdir)
    # The run's own reports are untouched.
    assert _json(os.path.join(workdir, "summary.json")) == run_summary

    # Same name again: refused without --overwrite, replaced with it.
    with pytest.raises(FileExistsError, match="--overwrite"):
        _cli(["--workdir", workdir, "--data", str(hospital)])
    _cli(["--workdir", workdir, "--data", str(hospital), "--overwrite", "--qc_score", "image_mean"])
    assert _json(os.path.join(out, "summary.json"))["qc"]["score"] == "image_mean"
    _no_partial(workdir)


def test_target_domain_as_a_folder_scores_as_the_target(tiny_workdir, tfds_dir, tmp_path):
    """The run's own target, written out as a user's DoFE folder (lossless PNGs, masks in
    0/128/255) and evaluated as a new hospital, gets the target evaluator's scores case by case:
    same checkpoint, same preprocessing, same post-processing."""
    from data_builders.fundus.fundus import MASK_VALUE_TO_CLASS
    from puseg_jax.core.datasets import get_dataset_info
    from puseg_jax.data import sources
    from puseg_jax.external import pipeline as external_pipeline

    workdir = _copy_workdir(tiny_workdir, tmp_path)
    config = test_config(**{"data.data_dir": tfds_dir})
    info = get_dataset_info(config.data.name)
    source = sources.load_source(
        info, "Domain3", "test", tfds_dir, config.data.builder_config.to_dict()
    )
    folder = tmp_path / "user" / "exported"
    value = np.zeros(256, np.uint8)
    for v, c in MASK_VALUE_TO_CLASS.items():
        value[c] = v
    for kind in ("image", "mask"):
        (folder / "test" / "ROIs" / kind).mkdir(parents=True)
    for ex in source:
        case = ex["case_id"].decode() if isinstance(ex["case_id"], bytes) else ex["case_id"]
        Image.fromarray(ex["image"]).save(folder / "test/ROIs/image" / f"{case}.png")
        Image.fromarray(value[ex["mask"][..., 0]]).save(folder / "test/ROIs/mask" / f"{case}.png")
    external_pipeline.evaluate_external(workdir, folder)

    def scores(name):
        rows = _csv(os.path.join(workdir, "eval", name, "per_case.csv"))
        return {
            (r["case_id"], r["structure"]): [float(r[m]) for m in ("dice", "hd95")] for r in rows
        }

    target, external = scores("Domain3"), scores("exported")
    assert len(target) == 2 * len(source) and target.keys() == external.keys()
    for key, expected in target.items():
        assert external[key] == pytest.approx(expected, abs=1e-6), key
    # The summaries agree too: the grid, the distances and the calibration on it. (The sampled
    # uncertainty map is not compared: its noise depends on an example's place in its batch,
    # and the two builds order the cases differently.)
    a = _json(os.path.join(workdir, "eval", "Domain3", "summary.json"))
    b = _json(os.path.join(workdir, "eval", "exported", "summary.json"))
    for key in ("resolution", "distance", "uncertainty_resolution", "num_cases"):
        assert a[key] == b[key], key
    for key in ("ece", "brier", "nll", "error_rate"):
        assert b["uncertainty"][key] == pytest.approx(a["uncertainty"][key], abs=1e-6), key


def test_unlabelled_flat_folder(tiny_workdir, shared_data, tmp_path):

    workdir = _copy_workdir(tiny_workdir, tmp_path)
    folder = tmp_path / "user" / "clinic"
    shutil.copytree(
        shared_data / "fundus" / "Domain2" / "test" / "ROIs" / "image", folder / "image"
    )
    _cli(["--workdir", workdir, "--data", str(folder), "--name", "clinic_2024"])

    out = os.path.join(workdir, "eval", "clinic_2024")
    summary = _json(os.path.join(out, "summary.json"))
    assert not summary["scored"] and "no score was computed" in summary["note"]
    assert "structures" not in summary and "detection" not in summary["qc"]
    assert not {"resolution", "distance", "uncertainty", "uncertainty_resolution"} & set(summary)
    assert not os.path.exists(os.path.join(out, "per_case.csv"))
    review = _csv(os.path.join(out, "review.csv"))
    assert len(review) == 3 and not any(k.startswith("dice") for k in review[0])
    with np.load(os.path.join(out, "predictions.npz")) as z:
        assert "label" not in z.files and len(z["probability"]) == 3
    for r in review:
        image = Image.open(folder / "image" / f"{r['case_id']}.png")
        for kind in ("pred", "uncertainty"):
            assert Image.open(
                os.path.join(out, "predictions", f"{r['case_id']}_{kind}.png")
            ).size == (image.size)
    # Panels without ground truth: image | prediction | uncertainty, narrower than a scored
    # case's five tiles.
    panel = next(f for f in os.listdir(out) if f.startswith("panel_0_"))
    scored = next(
        f for f in os.listdir(os.path.join(workdir, "eval", "Domain3")) if f.startswith("panel_0")
    )
    width = Image.open(os.path.join(out, panel)).size[0]
    assert width < Image.open(os.path.join(workdir, "eval", "Domain3", scored)).size[0]


def test_panel_without_labels_has_no_ground_truth_or_errors():
    from puseg_jax.drawing import panels

    image = np.zeros((16, 16, 3), np.float32)
    pred = np.zeros((2, 16, 16), bool)
    pred[0, 4:12, 4:12] = True
    u = np.full((16, 16), 0.3)
    tiles = panels.panel_tiles(image, None, pred, u)
    assert len(tiles) == len(panels.UNLABELLED_TILE_TITLES) == 3
    fig = panels.panel_figure(image, None, pred, u, ("OD", "OC"), "t", "case a · no labels")
    texts = {t.get_text() for t in fig.texts}
    assert set(panels.UNLABELLED_TILE_TITLES) <= texts and "ground truth" not in texts
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["OD", "OC"]


def test_unlabelled_masks_are_never_scored():
    """255 (`UNLABELLED_MASK_VALUE`) is no class: scoring it, on either grid, is an error."""
    from puseg_jax.core.datasets import get_dataset_info
    from puseg_jax.evaluators import scoring

    info = get_dataset_info("fundus")
    n, size = 2, 8
    pred = Predictions(
        probability=np.full((n, size, size, 2), 0.9, np.float32),
        uncertainty=np.zeros((n, size, size), np.float32),
        label=np.full((n, size, size), common.UNLABELLED_MASK_VALUE, np.uint8),
        case_id=np.array(["a", "b"]),
        slice_index=np.zeros(n, np.int32),
        spacing=np.ones((n, 3), np.float32),
        spacing_unit=np.array(["pixel"] * n),
        native_shape=np.full((n, 2), 12, np.int32),
        native_spacing=np.ones((n, 3), np.float32),
        native_label=np.empty(n, object),
    )
    for i in range(n):
        pred.native_label[i] = np.full((12, 12), common.UNLABELLED_MASK_VALUE, np.uint8)
    for resolution in scoring.RESOLUTIONS:
        config = test_config(**{"eval.resolution": resolution})
        with pytest.raises(ValueError, match="without labels"):
            scoring.score_cases(pred, info, config, full=True)


def test_fundus_prediction_is_pasted_back_into_the_whole_image(tmp_path):
    """The network saw the centre crop: the written mask and uncertainty have the image's size,
    the prediction inside the crop window, background and U = 0 outside."""
    from puseg_jax.core.datasets import get_dataset_info
    from puseg_jax.external import writers

    path = tmp_path / "wide.png"
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(path)
    masks = np.zeros((2, 20, 20), bool)  # on the native grid: the 20 x 20 crop
    masks[0] = True  # disc everywhere the network looked
    masks[1, 5:15, 5:15] = True  # cup in its middle
    u = np.full((20, 20), 0.5, np.float32)
    info = get_dataset_info("fundus")
    written = writers.write_fundus_case(masks, u, path, 20, info, str(tmp_path), "wide")
    mask = np.asarray(Image.open(tmp_path / "wide_pred.png"))
    unc = np.asarray(Image.open(tmp_path / "wide_uncertainty.png"))
    assert mask.shape == unc.shape == (30, 40)
    window = (slice(5, 25), slice(10, 30))  # fundus.center_crop_window((30, 40), 20)
    inside = np.zeros((30, 40), bool)
    inside[window] = True
    assert np.all(mask[~inside] == 255) and np.all(unc[~inside] == 0)
    assert np.all(unc[inside] == 128)  # round(0.5 * 255)
    assert set(np.unique(mask[inside])) == {0, 128}
    assert mask[15, 20] == 0 and mask[6, 11] == 128  # cup at the centre, rim at the edge
    assert written["size"]["OD"] == 400 and written["size"]["OC"] == int((mask == 0).sum()) == 100
    with pytest.raises(ValueError, match="native grid"):  # a prediction of another grid
        writers.write_fundus_case(masks[:, :10], u, path, 20, info, str(tmp_path), "wide")


# ---------------------------------------------------------------------------------------------
# NIfTI: predictions on the input's own grid.


def _perfect_predictions(ext, info, config, data_dir, uncertainty: float = 0.25):
    """`predict_split`'s output with the model replaced by the ground truth at the network grid."""
    from puseg_jax.data import pipeline as data_pipeline
    from puseg_jax.external import folders

    fields = {  # batch key: Predictions field
        "mask": "label",
        "case_id": "case_id",
        "slice_index": "slice_index",
        "spacing": "spacing",
        "spacing_unit": "spacing_unit",
        "image": "image",
        "native_shape": "native_shape",
        "native_spacing": "native_spacing",
        "native_mask": "native_label",
    }
    rows = {k: [] for k in fields.values()}
    for batch in data_pipeline.eval_batches(
        info, config, folders.DOMAIN, folders.SPLIT, data_dir, 4, native_masks=True
    ):
        for k, field in fields.items():
            rows[field].append(batch[k][batch["valid"]])
    pred = {k: np.concatenate(v) for k, v in rows.items()}
    return Predictions(
        **pred,
        probability=np.eye(info.num_outputs, dtype=np.float32)[pred["label"]],
        uncertainty=np.where(pred["label"] > 0, uncertainty, 0.0).astype(np.float32),
    )


def _nifti_round_trip(folder, tmp_path, image_size):
    from puseg_jax.core.datasets import get_dataset_info
    from puseg_jax.external import folders, writers

    info = get_dataset_info("prostate")
    config = test_config(**{"data.name": "prostate", "data.image_size": image_size})
    ext = folders.find_external_data(folder, "prostate")
    assert ext.labels and ext.layout == "nifti"
    data_dir = str(tmp_path / "tfds")
    ext_info, ext_config = folders.prepare_external(ext, info, config, data_dir)
    pred = _perfect_predictions(ext, ext_info, ext_config, data_dir)
    out = str(tmp_path / "out")
    written = writers.write_native_predictions(pred, ext, ext_info, ext_config, out)
    return written, out


def test_promise12_prediction_lies_where_the_label_is(shared_data, tmp_path):
    src = shared_data / "prostate_nifti" / "promise12_case00"
    folder = tmp_path / "user" / "promise"
    folder.mkdir(parents=True)
    for f in ("Case00.nii.gz", "Case00_segmentation.nii.gz"):
        shutil.copyfile(src / f, folder / f)
    image = nib.load(folder / "Case00.nii.gz")
    assert nib.aff2axcodes(image.affine) != ("R", "A", "S")  # the reorientation is exercised
    # 128 x 128 slices are stored at 384 and fed at 128: nearest both ways is the identity, so a
    # perfect predictor must give back the label voxel for voxel.
    written, out = _nifti_round_trip(folder, tmp_path, image_size=128)
    pred = nib.load(os.path.join(out, "Case00_pred.nii.gz"))
    unc = nib.load(os.path.join(out, "Case00_uncertainty.nii.gz"))
    label = np.asarray(nib.load(folder / "Case00_segmentation.nii.gz").dataobj)
    for img in (pred, unc):
        assert img.shape == image.shape and np.allclose(img.affine, image.affine)
    assert np.array_equal(np.asarray(pred.dataobj), label)
    u = np.asarray(unc.dataobj)
    assert unc.get_data_dtype() == np.float32
    assert np.allclose(u[label == 1], 0.25) and np.allclose(u[label == 0], 0.0)
    voxel = float(np.prod(image.header.get_zooms()[:3]))
    assert written["Case00"]["size"]["prostate"] == pytest.approx(label.sum() * voxel)


@pytest.mark.parametrize(
    "axes", [((0, 1), (1, -1), (2, 1)), ((2, -1), (0, 1), (1, -1))], ids=["LAS", "PSR"]
)
def test_nifti_prediction_keeps_any_orientation(tmp_path, axes):
    """Oblique to nothing, but permuted and flipped axes, non-square slices: the written
    prediction of a perfect predictor overlaps the label (and a wrong inversion would not)."""
    affine = np.zeros((4, 4))
    affine[3, 3] = 1
    for i, (world, sign) in enumerate(axes):
        affine[world, i] = sign * (0.7 + 0.4 * i)
    shape = (30, 22, 26)
    label = np.zeros(shape, np.uint8)
    label[3:14, 4:12, 5:20] = 1  # off-centre on every axis
    folder = tmp_path / "user" / "site"
    folder.mkdir(parents=True)
    volume = np.random.rand(*shape).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, affine), folder / "Case07.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), folder / "Case07_segmentation.nii.gz")
    _, out = _nifti_round_trip(folder, tmp_path, image_size=64)
    pred = nib.load(os.path.join(out, "Case07_pred.nii.gz"))
    assert pred.shape == shape and np.allclose(pred.affine, affine)
    p = np.asarray(pred.dataobj) == 1
    dice = 2 * (p & (label == 1)).sum() / (p.sum() + label.sum())
    assert dice > 0.9, dice


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, and nothing half-written.


def test_bad_folders(tmp_path, shared_data):
    from puseg_jax.external import pipeline as external_pipeline

    workdir = _fake_workdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        external_pipeline.evaluate_external(workdir, tmp_path / "nowhere")
    empty = tmp_path / "user" / "empty"
    empty.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="DoFE layout"):
        external_pipeline.evaluate_external(workdir, empty)
    # Masks were promised (a mask folder) but one is missing.
    hospital = _hospital(shared_data, tmp_path)
    missing = next((hospital / "test/ROIs/mask").iterdir())
    missing.unlink()
    with pytest.raises(common.DataError, match=f"image without mask: .*{missing.name}"):
        external_pipeline.evaluate_external(workdir, hospital)
    unlabelled = tmp_path / "user" / "flat"
    (unlabelled / "image").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="labels='yes'"):
        external_pipeline.evaluate_external(workdir, unlabelled, labels="yes")
    with pytest.raises(common.DataError, match="center_crop"):
        external_pipeline.evaluate_external(workdir, hospital, labels="no", center_crop=600)
    both = tmp_path / "user" / "both"
    (both / "image").mkdir(parents=True)
    (both / "test" / "ROIs" / "image").mkdir(parents=True)
    with pytest.raises(common.DataError, match="keep one layout"):
        external_pipeline.evaluate_external(workdir, both)
    assert not os.path.exists(os.path.join(workdir, "eval"))  # all refused before any writing


def test_bad_workdirs_and_names(tmp_path, shared_data):
    from puseg_jax.external import pipeline as external_pipeline

    hospital = _hospital(shared_data, tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        external_pipeline.evaluate_external(str(tmp_path / "nowhere"), hospital)
    unknown = _fake_workdir(tmp_path)
    cfg = json.loads(Path(unknown, "config.json").read_text())
    cfg["data"]["name"] = "retina_oct"
    Path(unknown, "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="Unknown dataset 'retina_oct'"):
        external_pipeline.evaluate_external(unknown, hospital)

    workdir = _fake_workdir(tmp_path, "synth_fundus")
    shutil.rmtree(os.path.join(workdir, "checkpoints"))
    with pytest.raises(FileNotFoundError, match="holds steps"):
        external_pipeline.evaluate_external(workdir, hospital)
    os.remove(os.path.join(workdir, "summary.json"))
    with pytest.raises(FileNotFoundError, match="has not finished"):
        external_pipeline.evaluate_external(workdir, hospital)

    workdir = _fake_workdir(tmp_path, "fundus", step=3)
    with pytest.raises(ValueError, match=r"evaluator of .* \(role target\)"):
        external_pipeline.evaluate_external(workdir, hospital, name="Domain3")
    with pytest.raises(ValueError, match="--name"):
        external_pipeline.evaluate_external(workdir, hospital, name="../elsewhere")
    with pytest.raises(ValueError, match="qc_score"):
        external_pipeline.evaluate_external(workdir, hospital, qc_score="vibes")


def test_a_run_older_than_some_config_fields_is_read_with_their_defaults(tmp_path, capsys):
    from configs import default
    from puseg_jax.external import pipeline as external_pipeline

    workdir = _fake_workdir(tmp_path)
    path = Path(workdir, "config.json")
    saved = json.loads(path.read_text())
    del saved["loss"]["highlight_terms"]  # a field added after the run was trained
    saved["loss"]["alpha"] = 0.5  # and one the run set itself
    path.write_text(json.dumps(saved))
    config = external_pipeline.load_run_config(workdir)
    assert config.loss.highlight_terms == default.get_config().loss.highlight_terms
    assert config.loss.alpha == 0.5 and config.data.name == "fundus"
    assert "taken at their defaults: loss.highlight_terms" in capsys.readouterr().out


def test_wrong_nifti_pairs_leave_nothing(tmp_path):
    from puseg_jax.external import pipeline as external_pipeline

    workdir = _fake_workdir(tmp_path, "prostate")
    site = tmp_path / "user" / "site"
    site.mkdir(parents=True)

    def save(name, shape=(8, 8, 3), dtype=np.uint8):
        nib.save(nib.Nifti1Image(np.ones(shape, dtype), np.eye(4)), site / name)

    save("Case00.nii.gz", dtype=np.float32)
    save("Case01.nii.gz", dtype=np.float32)
    save("Case00_segmentation.nii.gz")
    with pytest.raises(common.DataError, match="image without mask: .*Case01"):
        external_pipeline.evaluate_external(workdir, site)
    (site / "Case01.nii.gz").rename(site / "Case02.nii.gz")
    save("Case02_segmentation.nii.gz")
    save("Case03_segmentation.nii.gz")
    with pytest.raises(common.DataError, match="mask without image: .*Case03"):
        external_pipeline.evaluate_external(workdir, site)
    (site / "Case03_segmentation.nii.gz").unlink()
    # Paired by name, but of another shape: found while building, after the staging folder
    # exists; nothing is left behind.
    save("Case02_segmentation.nii.gz", shape=(8, 9, 3))
    with pytest.raises(common.DataError, match="shapes differ"):
        external_pipeline.evaluate_external(workdir, site)
    assert os.listdir(os.path.join(workdir, "eval")) == []
    with pytest.raises(common.DataError, match="No NIfTI volumes"):
        external_pipeline.evaluate_external(workdir, tmp_path / "user")


def test_nifti_folder_end_to_end(tmp_path):
    """A 2.5-D prostate run on a folder of unlabelled volumes. The run is a checkpoint of random
    weights (their shapes traced, nothing compiled but the eval step) and the summary a finished
    run writes; the folder holds one non-canonical volume with slices that are not square."""
    import jax

    from puseg_jax.external import pipeline as external_pipeline
    from puseg_jax.train import checkpoints, steps
    from puseg_jax.train import config as train_config

    config = test_config(
        **{
            "data.name": "prostate",
            "data.source_domains": ("RUNMC", "BMC"),
            "data.target_domains": ("BIDMC",),
            "data.context_slices": 1,
        }
    )
    info = train_config.validate_config(config)
    model = steps.create_model(config, info)
    dummy = np.zeros((1, 32, 32, steps.input_channels(config, info)), np.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), dummy)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(s.dtype), shapes["params"])
    stats = {k: v for k, v in shapes.items() if k == "batch_stats"}["batch_stats"]
    stats = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), stats)  # mean 1, var 1
    workdir = tmp_path / "run"
    ckpts = checkpoints.Checkpoints(str(workdir))
    cfg_json = train_config._config_json(config)
    state = {"step": np.int32(0), "params": params, "batch_stats": stats}
    ckpts.save(0, state, {"data_state": {}, "counters": {}}, cfg_json)
    ckpts.close()
    (workdir / "config.json").write_text(json.dumps(cfg_json))
    (workdir / "summary.json").write_text(json.dumps({"checkpoint": "last", "step": 0}))

    folder = tmp_path / "user" / "site"
    folder.mkdir(parents=True)
    affine = np.diag([-0.8, 0.7, 3.0, 1.0])[:, [1, 0, 2, 3]]  # axes (A, L, S)
    volume = rng.random((20, 24, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, affine), folder / "Case11.nii")
    res = external_pipeline.evaluate_external(str(workdir), folder)
    out = workdir / "eval" / "site"
    assert not res["scored"] and res["num_cases"] == 1 and res["num_examples"] == 5
    image = nib.load(folder / "Case11.nii")
    for kind in ("pred", "uncertainty"):
        written = nib.load(out / "predictions" / f"Case11_{kind}.nii.gz")
        assert written.shape == image.shape and np.allclose(written.affine, image.affine)
    labels = np.asarray(nib.load(out / "predictions" / "Case11_pred.nii.gz").dataobj)
    assert set(np.unique(labels)) <= {0, 1}
    review = _csv(out / "review.csv")
    assert review[0]["case_id"] == "Case11" and review[0]["size_unit"] == "mm3"
    assert float(review[0]["predicted_prostate"]) == pytest.approx(labels.sum() * 0.8 * 0.7 * 3)
    # No source-validation predictions in this run: the fallback score, and why.
    assert res["qc"]["choice"]["criterion"] == "fallback" and res["qc"]["choice"]["reason"]
