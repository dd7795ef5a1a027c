"""One record of a run: `Predictions` round-trips through predictions.npz, `RunFolder` reads a
trained workdir, and every consumer (notebook helpers, suite tables and statistics, explain and
report, the external QC, the visualize command) sees what the reader sees; no other module opens
the report files by name."""

import ast
import csv
import os
import shutil

import numpy as np
import pytest

from puseg_jax.evaluators import records
from puseg_jax.evaluators.records import Predictions
from tests import conftest

PACKAGE = conftest.REPO / "puseg_jax"
REPORT_FILES = (records.SUMMARY_FILE, records.PER_CASE_FILE, records.PREDICTIONS_FILE)
# The writer and reader of the files (`records`) and the one module that finds them in a run.
READERS = {PACKAGE / "evaluators" / "records.py", PACKAGE / "runs" / "run_folder.py"}


def _small_predictions(n=3, size=4, seed=0):
    rng = np.random.default_rng(seed)
    return Predictions(
        image=rng.random((n, size, size, 3)).astype(np.float32),
        label=rng.integers(0, 3, (n, size, size)).astype(np.int32),
        probability=rng.random((n, size, size, 2)).astype(np.float32),
        uncertainty=rng.random((n, size, size)).astype(np.float32),
        case_id=np.array([f"c{i}" for i in range(n)]),
        slice_index=np.zeros(n, np.int32),
        spacing=np.ones((n, 3), np.float32),
        spacing_unit=np.array(["pixel"] * n),
        native_shape=np.full((n, 2), 8, np.int32),
        native_spacing=np.ones((n, 3), np.float32),
        index=np.arange(n),
    )


def test_predictions_round_trip_with_the_same_names_on_disk(tmp_path):
    pred = _small_predictions()
    path = str(tmp_path / records.PREDICTIONS_FILE)
    pred.replace(resolution="native").save(path)
    with np.load(path) as z:
        on_disk = set(z.files)
        assert z["probability"].dtype == np.float16 and z["label"].dtype == np.uint8
    # Memory-only fields stay in memory; every other field is stored under its own name.
    assert on_disk == {
        "image",
        "label",
        "probability",
        "uncertainty",
        "case_id",
        "slice_index",
        "spacing",
        "spacing_unit",
        "native_shape",
        "native_spacing",
        "resolution",
    }
    back = Predictions.load(path)
    assert back.resolution == "native" and back.index is None and back.native_label is None
    for name in ("image", "probability", "uncertainty"):
        value = getattr(back, name)
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, getattr(pred, name).astype(np.float16))
    np.testing.assert_array_equal(back.label, pred.label)
    assert back.case_id.tolist() == ["c0", "c1", "c2"]
    # A domain without labels stores none.
    pred.save(path, with_label=False)
    assert Predictions.load(path).label is None


def test_predictions_of_older_files_still_load(tmp_path):
    pred = _small_predictions()
    # An evaluation older than the native grid fields wrote these arrays only.
    old = str(tmp_path / "old.npz")
    np.savez(
        old,
        image=pred.image.astype(np.float16),
        label=pred.label.astype(np.uint8),
        probability=pred.probability.astype(np.float16),
        uncertainty=pred.uncertainty.astype(np.float16),
        case_id=pred.case_id,
        slice_index=pred.slice_index,
    )
    back = Predictions.load(old)
    assert back.native_shape is None and back.resolution is None
    np.testing.assert_array_equal(back.label, pred.label)
    # A file written with the in-memory names of older code ('probs', 'mask').
    older = str(tmp_path / "older.npz")
    np.savez(older, probs=pred.probability, mask=pred.label, case_id=pred.case_id)
    back = Predictions.load(older)
    np.testing.assert_array_equal(back.probability, pred.probability)
    np.testing.assert_array_equal(back.label, pred.label)


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_every_consumer_reads_the_run_as_the_reader_does(tiny_workdir, tmp_path, capsys):
    from puseg_jax import report, visualize
    from puseg_jax.evaluators import reports
    from puseg_jax.external import qc
    from puseg_jax.runs import explain, stats, tables
    from puseg_jax.runs import workdir as runs_workdir
    from puseg_jax.runs.run_folder import RunFolder

    run = RunFolder(tiny_workdir)
    names = run.evaluator_names()
    summary = run.summary()
    assert set(summary["evals"]) == set(names)
    which, step, label = run.reported_checkpoint()
    assert label == summary["checkpoint"] and step == summary["step"] and which in ("last", "best")
    assert step in run.checkpoint_steps(which)

    # The reader against the files read here by hand.
    for name in names:
        per_case = run.per_case(name)
        rows = _csv_rows(os.path.join(tiny_workdir, "eval", name, "per_case.csv"))
        assert [(r["case_id"], r["structure"]) for r in rows] == [
            (c, s) for c, row in per_case.items() for s in row
        ]
        assert [float(r["dice"]) for r in rows] == [
            m["dice"] for row in per_case.values() for m in row.values()
        ]
        pred = run.predictions(name)
        with np.load(os.path.join(tiny_workdir, "eval", name, "predictions.npz")) as z:
            np.testing.assert_array_equal(pred.probability, z["probability"].astype(np.float32))
            np.testing.assert_array_equal(pred.label, z["label"])
            assert pred.case_id.tolist() == z["case_id"].tolist()
        mean = np.mean([row["OD"]["dice"] for row in per_case.values()])
        assert mean == pytest.approx(summary["evals"][name]["OD"]["dice"], abs=1e-12)

    # The notebook helpers (and so the visualize command, which opens the run through them).
    wd = runs_workdir.open_workdir(tiny_workdir)
    assert wd.config.to_dict() == run.config.to_dict()
    assert set(wd.evals) == set(names)
    for name in names:
        assert wd.evals[name] == run.eval_summary(name)
        assert runs_workdir.load_per_case(wd, name) == run.per_case(name)
        a, b = runs_workdir.load_predictions(wd, name), run.predictions(name)
        np.testing.assert_array_equal(a.probability, b.probability)
        np.testing.assert_array_equal(a.uncertainty, b.uncertainty)
    written = visualize.write_domain_pngs(wd, "Domain3", str(tmp_path / "png"), 1)
    assert written and all(os.path.isfile(p) for p in written)

    # The suite's tables and statistics, on a suite layout of the run.
    seed_dir = tmp_path / "suite" / "fundus" / "cpu" / "Domain3" / "ours" / "seed0"
    shutil.copytree(tiny_workdir, seed_dir)
    (found,) = tables.collect(tmp_path / "suite", "fundus")
    assert found["summary"] == summary and found["method"] == summary["method"]
    target = stats.target_eval(summary)[0]
    dice = stats.read_per_case(seed_dir, target)
    assert dice == {
        (c, s): m["dice"] for c, row in run.per_case(target).items() for s, m in row.items()
    }

    # explain and the report command read the summary the reader reads.
    text = report.main([os.path.join(tiny_workdir, "summary.json")])
    assert text == reports.format_table([summary]) + "\n\n" + explain.explain([summary])
    capsys.readouterr()

    # The external evaluation's QC reads the source-validation predictions and Dice.
    preds, qc_dice, missing = qc.source_val_predictions(tiny_workdir, run.config)
    assert not missing and set(preds) == {n for n in names if n != target}
    for name, pred in preds.items():
        np.testing.assert_array_equal(pred.probability, run.predictions(name).probability)
        assert qc_dice[name] == records.case_dice(run.per_case(name))


def _file_literals(path):
    """String constants of a module that name a report file as a path (no spaces: messages and
    docstrings that mention a file are not paths)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            if " " not in text and "\n" not in text and text.split("/")[-1] in REPORT_FILES:
                found.append(text)
    return found


def test_only_the_reader_names_the_report_files():
    offenders = {
        str(p.relative_to(PACKAGE)): _file_literals(p)
        for p in sorted(PACKAGE.rglob("*.py"))
        if p not in READERS and _file_literals(p)
    }
    assert offenders == {}
    # The check finds what it looks for.
    assert set(_file_literals(PACKAGE / "evaluators" / "records.py")) == set(REPORT_FILES)
