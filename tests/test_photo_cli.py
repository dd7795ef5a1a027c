"""`python -m puseg_jax.evaluate` on a folder of whole photographs (issue 22), end to end with
the session's tiny trained workdir.

The photographs are synthetic (`test_photos.synth_photo`: a circular field of view on black and a
disc of known centre). The tiny model cannot find a disc in a 600 x 800 photograph, so the
localisation's predict function is replaced by `test_photos`' colour oracle (it sees the disc
exactly where the disc-coloured pixels are): the test checks the wiring (decision, localisation
into review.csv, staging, prediction by the run's own checkpoint, paste-back, photograph-grid
scores and files, bad images skipped), while `test_photos` checks the search itself and
benchmarks/bench_photos.py the real model on real photographs.
"""

import csv
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from puseg_jax import evaluate
from puseg_jax.external import photo_checks, photo_eval
from tests.test_photos import synth_photo


def colour_oracle(regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """As `test_photos.fake_predict`, at any input size."""
    p = np.clip((regions[..., 1].astype(np.float32) - 120.0) / 60.0, 0.0, 1.0)
    return p, 4.0 * p * (1.0 - p)


def _save(folder: Path, name: str, image: np.ndarray, mask: np.ndarray) -> None:
    Image.fromarray(image).save(folder / "image" / f"{name}.png")
    Image.fromarray(mask, "L").save(folder / "mask" / f"{name}.png")


def test_folder_of_photographs_end_to_end(tiny_workdir, tmp_path, monkeypatch, capsys):
    workdir = str(tmp_path / "run")
    shutil.copytree(tiny_workdir, workdir)
    monkeypatch.setattr(photo_eval, "photo_predict_fn", lambda *a, **k: colour_oracle)
    folder = tmp_path / "clinic"
    (folder / "image").mkdir(parents=True)
    (folder / "mask").mkdir()
    discs = {"left": ((300, 250), 90), "right": ((280, 560), 70)}
    for name, disc in discs.items():
        _save(folder, name, *synth_photo(discs=(disc,), seed=len(name)))
    # The bad ones: no disc in the field, a grey image, a tiny image, a mask of another size.
    _save(folder, "nodisc", *synth_photo(discs=()))
    _save(folder, "grey", np.full((600, 800, 3), 128, np.uint8), np.full((600, 800), 255, np.uint8))
    _save(folder, "tiny", np.full((20, 20, 3), 90, np.uint8), np.full((20, 20), 255, np.uint8))
    photo, mask = synth_photo(seed=3)
    _save(folder, "wrongmask", photo, mask[:500])

    res = evaluate.main(["--workdir", workdir, "--data", str(folder)])
    out = capsys.readouterr().out

    # The decision, once per folder with counts, and per image since the folder is mixed.
    assert "[eval] framing: 4 of 6 images are whole photographs" in out
    assert "4 of 4 corners dark" in out
    assert "[eval]   grey: region" in out and "[eval]   left: photograph" in out
    # One line per bad image, the others processed.
    skipped = {s["case_id"]: s["kind"] for s in res["photographs"]["skipped"]}
    assert skipped == {
        "nodisc": "no_disc",
        "grey": "uniform",
        "tiny": "too_small",
        "wrongmask": "mask_shape",
    }
    for case_id, kind in skipped.items():
        assert f"[eval] {case_id}: skipped ({kind}): {case_id}: " in out
    assert set(res["photographs"]["cases"]) == set(discs)

    # Nothing half-written; the report in place.
    report = Path(workdir, "eval", "clinic")
    assert not [p for p in os.listdir(report.parent) if p.startswith(".partial")]
    with open(report / "review.csv") as f:
        review = list(csv.DictReader(f))
    assert sorted(r["case_id"] for r in review) == sorted(discs)
    for column in ("loc_row", "loc_col", "loc_diameter", "loc_box", "loc_confidence"):
        assert column in review[0]
    for r in review:
        assert math.isfinite(float(r["qc_score"])) and r["framing"] == "photograph"
        # The centre found: the centroid of the disc's pixels (the oracle is exact).
        image, mask = synth_photo(discs=(discs[r["case_id"]],), seed=len(r["case_id"]))
        rows, cols = np.nonzero(mask < 255)
        assert abs(float(r["loc_row"]) - rows.mean()) <= 1.0
        assert abs(float(r["loc_col"]) - cols.mean()) <= 1.0
        # Predictions on the photograph's grid, at its size.
        for suffix in ("pred", "uncertainty"):
            with Image.open(report / "predictions" / f"{r['case_id']}_{suffix}.png") as im:
                assert im.size == (800, 600)
        pred = photo_checks.read_mask(report / "predictions" / f"{r['case_id']}_pred.png")
        top, left, side = (int(x) for x in r["loc_box"].split("/"))
        outside = np.ones(pred.shape, bool)
        outside[max(top, 0) : top + side, max(left, 0) : left + side] = False
        assert (pred[outside] == 255).all()  # nothing predicted outside the located region
    # Scored on the photograph's grid, like every domain.
    assert res["distance"] == "2-D, pixels of each whole photograph"
    assert set(res["structures"]) == {"OD", "OC"} and res["num_cases"] == 2
    assert any(p.name.startswith("panel_0_") for p in report.iterdir())

    # --framing=region: the old behaviour, every image resized whole (none is located).
    for p in folder.rglob("*.png"):
        if p.stem not in discs:
            p.unlink()
    res = evaluate.main(
        ["--workdir", workdir, "--data", str(folder), "--framing=region", "--name", "whole"]
    )
    assert "photographs" not in res and res["num_cases"] == 2
    assert "[eval] framing" not in capsys.readouterr().out
