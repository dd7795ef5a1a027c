"""Panels (`panels`), inspection helpers, the `python -m puseg_jax.visualize` tool and TensorBoard
images."""

import glob
import json
import os
import shutil
import struct

import numpy as np
import pytest
from PIL import Image

from puseg_jax.evaluators.records import Predictions
from tests import conftest

# ---------------------------------------------------------------------------------------------
# A volumetric (prostate-like) workdir without training: known predictions of 3-D cases go
# through evaluation's own scoring and report writing, so the files have the real format.

VOLUME_SOURCES, VOLUME_TARGET = ("SiteA", "SiteB"), "SiteC"


def _volume_predictions(domain: str, num_cases: int, num_slices: int, size: int, seed: int):
    """Predictions of `num_cases` volumes: a gland (a disc on the middle slices), softmax
    probabilities that miss part of it, an uncertainty that is high at the boundary."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = {
        k: [] for k in ("image", "label", "probability", "uncertainty", "case_id", "slice_index")
    }
    for c in range(num_cases):
        radius = size * rng.uniform(0.2, 0.3)
        shift = rng.integers(-2, 3)
        for z in range(num_slices):
            inside = 0 < z < num_slices - 1
            gt = inside & ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius**2)
            # The prediction is the gland shifted sideways: a false negative and a false
            # positive crescent, as a model unsure of the edge would produce.
            pred_fg = np.roll(gt, shift + 1, axis=1)
            p_fg = np.where(pred_fg, 0.85, 0.1) + rng.uniform(-0.05, 0.05, gt.shape)
            edge = gt ^ ndimage.binary_erosion(gt)
            out["image"].append(
                (gt * 1.5 + rng.normal(0, 0.5, gt.shape))[..., None].astype(np.float32)
            )
            out["label"].append(gt.astype(np.uint8))
            out["probability"].append(np.stack([1 - p_fg, p_fg], -1).astype(np.float32))
            out["uncertainty"].append(np.where(edge, 0.8, 0.1).astype(np.float32))
            out["case_id"].append(f"{domain}_test_{c:04d}")
            out["slice_index"].append(z)
    pred = {k: np.asarray(v) for k, v in out.items()}
    n = len(pred["case_id"])
    pred["spacing"] = np.tile(np.array([0.6, 0.6, 3.0], np.float32), (n, 1))
    pred["spacing_unit"] = np.array(["mm"] * n)
    # The network's grid is the native one here.
    pred["native_shape"] = np.tile(np.array([size, size], np.int32), (n, 1))
    pred["native_spacing"] = pred["spacing"]
    pred["native_label"] = np.empty(n, object)
    for i, m in enumerate(pred["label"]):
        pred["native_label"][i] = m
    # Slices arrive out of order, as from a shuffled source, so re-stacking is exercised.
    order = rng.permutation(n)
    return Predictions(**{k: v[order] for k, v in pred.items()})


def make_volume_workdir(workdir: str, num_cases: int = 3, num_slices: int = 6, size: int = 24):
    """Writes config.json, eval/<domain>/ reports and TensorBoard events of a synthetic prostate
    run (no checkpoint) through `evaluation`'s scoring and report writer; returns the workdir."""
    from puseg_jax.core.datasets import get_dataset_info
    from puseg_jax.core.logging_utils import MetricWriter
    from puseg_jax.evaluators import reports, scoring
    from puseg_jax.train import config as train_config

    config = conftest.test_config(
        **{
            "data.name": "synth_prostate",
            "data.source_domains": VOLUME_SOURCES,
            "data.target_domains": (VOLUME_TARGET,),
            "eval.num_panels": 2,
        }
    )
    info = get_dataset_info(config.data.name)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(json.loads(config.to_json_best_effort()), f)
    writer = MetricWriter(workdir)
    for k, (name, ev) in enumerate(train_config.resolve_evals(config).items()):
        pred = _volume_predictions(ev["domain"], num_cases, num_slices, size, seed=k)
        res, rows = scoring.score_split(pred, info, config, ev, 7)
        reports.write_domain_reports(workdir, name, res, rows, pred, info, config, 7, writer)
    writer.close()
    return workdir


def _dice_text(per_case, case_id):
    """The Dice a figure should show for a case, written out here: 'prostate 0.812'."""
    return ", ".join(f"{s} {m['dice']:.3f}" for s, m in per_case[case_id].items())


@pytest.fixture(scope="module")
def volume_workdir(tmp_path_factory) -> str:
    return make_volume_workdir(str(tmp_path_factory.mktemp("volume_workdir")))


# ---------------------------------------------------------------------------------------------
# TensorBoard events, read without TensorFlow: TFRecord framing around Event protos.


def read_events(tb_dir: str) -> list[tuple[int, str, str]]:
    """(step, tag, kind) of every summary value in the event files of a folder; kind is the
    value's oneof field ('simple_value', 'image', 'histo')."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4  # length, its CRC, the record, its CRC
            for v in event.summary.value:
                out.append((event.step, v.tag, v.WhichOneof("value")))
    return out


# ---------------------------------------------------------------------------------------------
# Panels.


def _disc_case(h: int = 8, w: int = 8):
    image = np.random.default_rng(0).normal(size=(h, w, 3)).astype(np.float32)
    gt = np.zeros((2, h, w), bool)
    gt[0, 2:6, 2:6] = True
    pred = np.zeros((2, h, w), bool)
    pred[0, 3:7, 2:6] = True  # row 2 missed (false negative), row 6 extra (false positive)
    u = np.linspace(0, 1, h * w).reshape(h, w)
    return image, gt, pred, u


def test_panel_tiles_show_masks_uncertainty_and_errors():
    from puseg_jax.drawing import panels

    image, gt, pred, u = _disc_case()
    tiles = panels.panel_tiles(image, gt, pred, u)
    assert len(tiles) == len(panels.TILE_TITLES) == 5
    assert all(t.shape == (8, 8, 3) and t.dtype == np.float32 for t in tiles)
    np.testing.assert_allclose(tiles[3], panels.heatmap(u), atol=1e-6)
    errors = tiles[4]
    np.testing.assert_allclose(errors[6, 3], panels.FP_COLOUR)
    np.testing.assert_allclose(errors[2, 3], panels.FN_COLOUR)
    assert errors[4, 4].max() < 0.41  # correct pixels are dimmed image
    # Overlays change exactly the masked pixels.
    assert not np.allclose(tiles[1][gt[0]], tiles[0][gt[0]])
    np.testing.assert_array_equal(tiles[1][~gt[0]], tiles[0][~gt[0]])


@pytest.mark.parametrize("size", [8, 64, 300])
def test_drawn_panel_has_large_tiles_titles_legend_and_colour_bar(size):
    from puseg_jax.drawing import panels

    image, gt, pred, u = _disc_case(size, size)
    title, subtitle = "ours · Domain1 (target) · step 300", "case c7 · Dice OD 0.953, OC 0.861"
    fig = panels.panel_figure(image, gt, pred, u, ("OD", "OC"), title, subtitle)
    texts = [t.get_text() for t in fig.texts]
    assert title in texts and subtitle in texts
    assert set(panels.TILE_TITLES) <= set(texts) and "uncertainty" in texts
    assert {"0.0", "1.0"} <= set(texts)  # colour bar ticks
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["OD", "OC", "false positive", "false negative"]

    panel = panels.render(fig)
    k = panels.display_scale(size, size)
    tile = size * k
    assert tile >= panels.MIN_TILE_PX and (k == 1 or size * (k - 1) < panels.MIN_TILE_PX)
    assert panel.dtype == np.uint8 and panel.ndim == 3 and panel.shape[2] == 3
    # Five tiles side by side, and room above and below them for the header, tile titles and
    # legend.
    assert panel.shape[1] >= 5 * tile and panel.shape[0] >= tile + 80
    # The image tile is the image, each pixel a k x k square (nearest, not interpolated).
    rgb = (panels.to_rgb(image) * 255).round().astype(np.uint8)
    top, left = panels._HEADER + panels._TILE_TITLE, panels._MARGIN
    np.testing.assert_array_equal(
        panel[top : top + tile, left : left + tile],
        np.repeat(np.repeat(rgb, k, axis=0), k, axis=1),
    )
    # Header text is drawn above the tiles.
    assert (panel[:top] < 100).any()


def test_case_arrays_restack_volumes_and_pick_the_largest_slice(volume_workdir):
    from puseg_jax import metrics
    from puseg_jax.drawing import panels
    from puseg_jax.evaluators import case_panels, scoring
    from puseg_jax.runs import workdir as runs_workdir

    wd = runs_workdir.open_workdir(volume_workdir)
    assert wd.info.volumetric and wd.eval_names == ["SiteA", "SiteB", "SiteC"]
    pred = runs_workdir.load_predictions(wd, "SiteC")
    cases = scoring.group_cases(pred, True)
    case_id, idx = cases[0]
    arrays = case_panels.case_arrays(pred, idx, wd.info, wd.config)
    assert arrays["gt"].shape == arrays["pred"].shape == (1, 6, 24, 24)
    assert arrays["image"].shape == (6, 24, 24, 1) and arrays["uncertainty"].shape == (6, 24, 24)
    # The end slices hold no gland; the re-stacked order puts them first and last.
    assert not arrays["gt"][:, 0].any() and not arrays["gt"][:, -1].any()
    assert 0 < panels.representative_slice(arrays["gt"]) < 5
    # The 3-D Dice of the shown masks is the scored one (up to float16 storage).
    dice = metrics.compute_dice(arrays["pred"][0], arrays["gt"][0])
    per_case = runs_workdir.load_per_case(wd, "SiteC")
    assert dice == pytest.approx(per_case[case_id]["prostate"]["dice"], abs=1e-6)


def test_evaluation_panels_carry_the_run_and_the_case_dice(tmp_path, monkeypatch):
    # Evaluation's panels are drawn with the run's header and each case's scored Dice, and the
    # PNG written is the drawn panel: the drawing is recorded while a volume workdir is written.
    import re

    from puseg_jax.drawing import panels
    from puseg_jax.runs import workdir as runs_workdir

    drawn = []
    real_draw = panels.draw_panel

    def recording_draw(image, gt, pred, uncertainty, structures, title, subtitle=""):
        out = real_draw(image, gt, pred, uncertainty, structures, title, subtitle)
        drawn.append((title, subtitle, gt, pred, out))
        return out

    monkeypatch.setattr(panels, "draw_panel", recording_draw)
    workdir = make_volume_workdir(str(tmp_path / "run"))
    monkeypatch.undo()

    wd = runs_workdir.open_workdir(workdir)
    files = sorted(glob.glob(os.path.join(workdir, "eval", VOLUME_TARGET, "panel_*.png")))
    assert len(files) == 2  # eval.num_panels
    target = [d for d in drawn if d[0] == f"ours · {VOLUME_TARGET} (target) · step 7"]
    assert len(target) == 2 and len(drawn) == 2 * 3  # two panels for each of the 3 evaluators
    per_case = runs_workdir.load_per_case(wd, VOLUME_TARGET)  # read back from per_case.csv
    for path, (_, subtitle, gt, pred, out) in zip(files, target, strict=True):
        case_id = os.path.basename(path).split("_", 2)[2][: -len(".png")]
        dice = panels.dice_text({s: m["dice"] for s, m in per_case[case_id].items()})
        assert re.fullmatch(rf"case {case_id}, slice [1-4] of 6 · Dice {dice}", subtitle)
        assert gt.any() and gt.shape == pred.shape == (1, 24, 24)  # a slice with the gland
        np.testing.assert_array_equal(np.asarray(Image.open(path))[..., :3], out)
    assert out.shape[1] >= 5 * panels.MIN_TILE_PX and out.shape[0] > panels.MIN_TILE_PX + 80


def test_select_cases_orders(volume_workdir):
    from puseg_jax.runs import workdir as runs_workdir

    wd = runs_workdir.open_workdir(volume_workdir)
    pred = runs_workdir.load_predictions(wd, "SiteA")
    per_case = runs_workdir.load_per_case(wd, "SiteA")
    dice = runs_workdir.mean_case_dice(per_case)
    worst = [c for c, _ in runs_workdir.select_cases(pred, per_case, wd.info, 3, "worst")]
    best = [c for c, _ in runs_workdir.select_cases(pred, per_case, wd.info, 2, "best")]
    assert [dice[c] for c in worst] == sorted(dice.values())
    assert best == worst[::-1][:2]
    u = runs_workdir.case_uncertainty(pred, wd.info)
    top = runs_workdir.select_cases(pred, per_case, wd.info, 1, "most_uncertain")[0][0]
    assert u[top] == max(u.values())
    with pytest.raises(ValueError, match="Unknown order"):
        runs_workdir.select_cases(pred, per_case, wd.info, 1, "random")


def test_open_workdir_errors(tmp_path, volume_workdir):
    from puseg_jax.runs import workdir as runs_workdir

    with pytest.raises(FileNotFoundError, match="config.json"):
        runs_workdir.open_workdir(str(tmp_path))
    copy = str(tmp_path / "copy")
    shutil.copytree(volume_workdir, copy)
    os.remove(os.path.join(copy, "eval", "SiteB", "predictions.npz"))
    with pytest.raises(FileNotFoundError, match=r"\['SiteB'\].*evaluate_if_missing"):
        runs_workdir.open_workdir(copy)


def test_figures_of_a_volume_workdir(volume_workdir):
    from puseg_jax.runs import workdir as runs_workdir
    from puseg_jax.runs import workdir_figures

    wd = runs_workdir.open_workdir(volume_workdir)
    pred = runs_workdir.load_predictions(wd, "SiteC")
    per_case = runs_workdir.load_per_case(wd, "SiteC")
    cases = runs_workdir.select_cases(pred, per_case, wd.info, 2, "worst")
    fig = workdir_figures.slice_grid_figure(wd, "SiteC", pred, per_case, cases[0][0])
    # Only the 4 slices with gland or prediction, one row of 5 tiles each.
    assert [ax.get_ylabel().split("\n")[0] for ax in fig.axes[:20:5]] == [
        f"slice {z}" for z in range(1, 5)
    ]
    assert cases[0][0] in fig.get_suptitle()
    fig = workdir_figures.cases_figure(wd, "SiteC", pred, per_case, cases)
    label = fig.axes[5].get_ylabel()
    assert cases[1][0] in label and _dice_text(per_case, cases[1][0]) in label
    preds = runs_workdir.load_all_predictions(wd)
    fig = workdir_figures.boundary_histogram_figure(wd, preds)
    # The synthetic uncertainty is 0.8 on the gland's edge and 0.1 elsewhere.
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[1] == "elsewhere: mean 0.100" and float(legend[0].split()[-1]) > 0.2
    assert len(workdir_figures.reliability_figure(wd).axes[0].lines) == 1 + 3
    fig = workdir_figures.dice_vs_uncertainty_figure(wd, {wd.path: preds})
    # One panel per structure, one point per case of each of the 3 evaluators, at (the case's
    # mean uncertainty, its Dice).
    ax = fig.axes[0]
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    assert len(ax.collections) == 3 and points.shape == (3 * 3, 2)
    u = runs_workdir.case_uncertainty(preds["SiteC"], wd.info)
    expected = [(u[c], per_case[c]["prostate"]["dice"]) for c in per_case]
    target = ax.collections[wd.eval_names.index("SiteC")]
    np.testing.assert_allclose(np.asarray(target.get_offsets()), expected, rtol=1e-6)
    table = runs_workdir.uncertainty_table(wd)
    assert table.count("\n") == 2 + 3 - 1 and "| SiteC | target |" in table


def test_compare_figure_titles_fit_with_a_long_method_name(volume_workdir, tmp_path):
    # The per-case Dice sits in the tile titles; rotated row labels used to run into the next
    # row when a method name was long.
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from puseg_jax.runs import workdir as runs_workdir
    from puseg_jax.runs import workdir_figures

    long_run = tmp_path / "long"
    shutil.copytree(volume_workdir, long_run)
    with open(long_run / "config.json") as f:
        config = json.load(f)
    config["method"] = "ours_no_highlight"
    with open(long_run / "config.json", "w") as f:
        json.dump(config, f)
    wd_a, wd_b = (
        runs_workdir.open_workdir(str(long_run)),
        runs_workdir.open_workdir(volume_workdir),
    )
    fig = workdir_figures.compare_figure(wd_a, wd_b, "SiteC", num=2)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    grid = np.asarray(fig.axes[:16]).reshape(2, 8)
    per_case = runs_workdir.load_per_case(wd_a, "SiteC")
    for row in grid:
        assert not any(ax.get_ylabel() for ax in row)
        case_id = row[0].get_title().split("\n")[0].split(", slice")[0]
        dice = _dice_text(per_case, case_id)
        assert row[2].get_title() == f"ours_no_highlight\nprediction\nDice {dice}"
        assert row[5].get_title().startswith("ours\nprediction\nDice ")
        boxes = [ax.title.get_window_extent(renderer) for ax in row]
        assert all(a.x1 <= b.x0 + 1 for a, b in zip(boxes, boxes[1:], strict=False))
    # The second row's titles stay below the first row's tiles.
    tiles_bottom = min(ax.get_window_extent(renderer).y0 for ax in grid[0])
    assert max(ax.title.get_window_extent(renderer).y1 for ax in grid[1]) <= tiles_bottom + 1


# ---------------------------------------------------------------------------------------------
# The command line.


def test_cli_volume_workdir_writes_slice_grids(volume_workdir, tmp_path):
    from puseg_jax import visualize

    written = visualize.main(
        ["--workdir", volume_workdir, "--domain", "SiteC", "--out", str(tmp_path), "--cases", "2"]
    )
    dest = tmp_path / "SiteC"
    assert all(os.path.dirname(p) == str(dest) for p in written)
    names = sorted(os.path.basename(p) for p in written)
    panels = [n for n in names if n.startswith("panel_")]
    cases = [n.split("_", 2)[2][: -len(".png")] for n in panels]
    assert names == sorted(["contact_sheet.png", *panels, *(f"slices_{c}.png" for c in cases)])
    assert len(panels) == 2
    # The same panels as evaluation wrote (the first cases, in the same order).
    reference = os.path.join(volume_workdir, "eval", "SiteC")
    assert panels == sorted(f for f in os.listdir(reference) if f.startswith("panel_"))
    for panel in panels:
        ours = np.asarray(Image.open(dest / panel)).astype(int)
        theirs = np.asarray(Image.open(os.path.join(reference, panel))).astype(int)
        assert ours.shape == theirs.shape
        assert np.mean(np.abs(ours - theirs) > 2) < 0.01


def test_cli_on_trained_workdir_matches_evaluation_panels(tiny_workdir, tmp_path):
    from puseg_jax import visualize

    out = tmp_path / "pngs"
    written = visualize.main(
        ["--workdir", tiny_workdir, "--out", str(out), "--cases", "2", "--compare", tiny_workdir]
    )
    for name in ("Domain1", "Domain2", "Domain3"):
        files = sorted(os.listdir(out / name))
        assert "contact_sheet.png" in files and "compare_ours_ours.png" in files
        assert sum(f.startswith("panel_") for f in files) == 2
    assert len(written) == 3 * 4
    # evaluation wrote panel_0 of each domain from float32 predictions; ours come from the
    # float16 predictions.npz and may differ on a few pixels only.
    ref = glob.glob(os.path.join(tiny_workdir, "eval", "Domain3", "panel_0_*.png"))[0]
    ours = out / "Domain3" / os.path.basename(ref)
    a = np.asarray(Image.open(ref)).astype(int)
    b = np.asarray(Image.open(ours)).astype(int)
    assert a.shape == b.shape
    assert np.mean(np.abs(a - b) > 2) < 0.01


def test_cli_flags(tiny_workdir, tmp_path, capsys):
    from puseg_jax import visualize

    def refused(argv, match):
        with pytest.raises(SystemExit, match=match) as e:
            visualize.main(argv)
        assert e.value.code != 0

    refused(["--workdir", tiny_workdir], "Flag --out must have a value")
    refused(["--workdir", tiny_workdir, "--out", str(tmp_path), "--cases=0"], "--cases=0")
    refused(["--workdir", tiny_workdir, "--out", str(tmp_path), "Domain1"], "unexpected argum")
    refused(["--workdir", tiny_workdir, "--out", str(tmp_path), "--order=random"], "<first|")
    with pytest.raises(SystemExit) as e:
        visualize.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("Draws PNG panels") and "DIR/<domain>/" in text
    assert "--evaluate_if_missing" in text and "--cases" in text
    # --domain repeats; nothing is left over from an earlier call (--order, --compare).
    written = visualize.main(
        ["--workdir", tiny_workdir, "--out", str(tmp_path), "--domain=Domain1", "--domain"]
        + ["Domain3", "--cases", "1"]
    )
    assert sorted(os.listdir(tmp_path)) == ["Domain1", "Domain3"]
    assert len(written) == 2 * 2


# ---------------------------------------------------------------------------------------------
# TensorBoard.


def test_tensorboard_images_and_histograms(tiny_workdir, volume_workdir):
    final = 4  # configs/test.py: num_train_steps
    events = read_events(os.path.join(tiny_workdir, "tb"))
    for name in ("Domain1", "Domain2", "Domain3"):
        assert (final, f"eval/{name}/panel_0", "image") in events
        assert (final, f"eval/{name}/uncertainty_hist", "histo") in events
    # The periodic evaluation at step 2 (source validation only) shows its cases too, and
    # the target is not evaluated before the end.
    for name in ("Domain1", "Domain2"):
        assert (2, f"eval/{name}/panel_0", "image") in events
        assert (2, f"eval/{name}/uncertainty_hist", "histo") in events
    assert not any(s == 2 and "Domain3" in tag for s, tag, _ in events)
    events = read_events(os.path.join(volume_workdir, "tb"))
    for i in range(2):
        assert (7, f"eval/SiteC/panel_{i}", "image") in events


def test_write_tensorboard(tmp_path):
    from puseg_jax.core.logging_utils import MetricWriter
    from puseg_jax.drawing import panels

    drawn = [("a", np.zeros((4, 6, 3), np.uint8)), ("b", np.full((4, 6, 3), 255, np.uint8))]
    u = np.random.default_rng(0).uniform(size=(2, 4, 4))
    writer = MetricWriter(str(tmp_path))
    panels.write_tensorboard(writer, 10, "SiteA", drawn, u, png_dir=str(tmp_path))
    panels.write_tensorboard(writer, 20, "SiteA", drawn, u)
    writer.close()
    events = read_events(str(tmp_path / "tb"))
    assert sorted(events) == [
        (step, f"eval/SiteA/{tag}", kind)
        for step in (10, 20)
        for tag, kind in (("panel_0", "image"), ("panel_1", "image"), ("uncertainty_hist", "histo"))
    ]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "panel_1_b.png")), drawn[1][1])


def test_open_workdir_evaluates_the_checkpoint_when_predictions_are_missing(
    volume_workdir, tmp_path, monkeypatch
):
    # trainer.evaluate_only itself (restore, predict, write eval/) is tested in
    # test_evaluation.py; here the decision to call it and what it is given.
    from puseg_jax.runs import workdir as runs_workdir
    from puseg_jax.train import trainer

    copy = str(tmp_path / "wd")
    shutil.copytree(volume_workdir, copy)
    missing = os.path.join(copy, "eval", "SiteC", "predictions.npz")
    os.remove(missing)
    calls = []

    def fake_evaluate_only(config, workdir):
        calls.append((config, workdir))
        shutil.copy(os.path.join(volume_workdir, "eval", "SiteC", "predictions.npz"), missing)

    monkeypatch.setattr(trainer, "evaluate_only", fake_evaluate_only)
    wd = runs_workdir.open_workdir(copy, evaluate_if_missing=True)
    assert len(calls) == 1 and calls[0][1] == copy
    config = calls[0][0]
    assert config.eval.save_predictions and config.data.name == "synth_prostate"
    assert list(config.data.target_domains) == ["SiteC"]
    assert runs_workdir.load_predictions(wd, "SiteC").probability.shape[-1] == 2
    runs_workdir.open_workdir(copy, evaluate_if_missing=True)
    assert len(calls) == 1  # nothing missing any more
