"""Looking at a trained workdir: where the model is unsure, and whether that is where it is wrong.

The helpers of `notebooks/inspect_uncertainty.ipynb` and of `python -m puseg_jax.visualize`:
open a workdir (its `config.json` and the `eval/<name>/` reports evaluation wrote, or its
checkpoint when the predictions were not saved), pick cases, and draw figures. Every figure is
a `matplotlib.figure.Figure` made without pyplot, so nothing is shown or kept open behind the
caller's back: a notebook displays the returned figure, a script saves it (`save_figure`).
"""

import csv
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from puseg_jax import config_diff, evaluation, metrics, panels
from puseg_jax.datasets import DatasetInfo, get_dataset_info

REPO_ROOT = Path(__file__).resolve().parents[1]
PREDICTIONS_FILE = "predictions.npz"
TILE_INCHES = 1.9  # side of one image tile in figures
ROLE_MARKERS = {"source_val": "o", "target": "X"}


@dataclasses.dataclass
class Workdir:
    """A trained run, as written by `train.train_and_evaluate`.

    Attributes:
      path: the workdir.
      config: the run's config (from `config.json`).
      info: the dataset family.
      evals: eval/<name>/summary.json of each evaluator, by name (sources first, then targets).
    """

    path: str
    config: ml_collections.ConfigDict
    info: DatasetInfo
    evals: dict[str, dict]

    @property
    def method(self) -> str:
        return str(self.config.method)

    @property
    def eval_names(self) -> list[str]:
        return list(self.evals)

    def role(self, name: str) -> str:
        """'source_val' or 'target'."""
        return self.evals[name]["role"]

    def eval_dir(self, name: str) -> str:
        return os.path.join(self.path, "eval", name)


def default_workdir(env_var: str = "PUSEG_WORKDIR", method: str = "ours") -> str:
    """`$env_var` if set, else the demo's `workdirs/demo/<method>` (`./run.sh demo`), looked up
    in the current directory first, then in the repository."""
    if os.environ.get(env_var):
        return os.environ[env_var]
    local = os.path.join("workdirs", "demo", method)
    if os.path.isdir(local):
        return local
    return str(REPO_ROOT / "workdirs" / "demo" / method)


def load_config(workdir: str, announce: str = "") -> ml_collections.ConfigDict:
    """The config a workdir was trained with (its config.json).

    Args:
      workdir: a training workdir.
      announce: a console prefix such as '[eval]': when set, the config fields the run predates
        (taken at their defaults, `config_diff.with_defaults`) are named on the console.

    Returns:
      The config, completed with the defaults of fields added since the run.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: is {workdir!r} a training workdir? (python -m puseg_jax.main "
            "writes config.json there; `./run.sh demo` writes workdirs/demo/erm and "
            "workdirs/demo/ours)"
        )
    with open(path) as f:
        # Fields are added with the old behaviour as their default, so a run older than some
        # fields computed what their defaults compute.
        completed, added = config_diff.with_defaults(json.load(f))
    if added and announce:
        print(
            f"{announce} {path} predates {len(added)} config field(s), taken at their defaults: "
            + ", ".join(added),
            flush=True,
        )
    return ml_collections.ConfigDict(completed)


def _evaluator_names(config: ml_collections.ConfigDict) -> list[str]:
    from puseg_jax import train

    return list(train.resolve_evals(config))


def missing_predictions(workdir: str) -> list[str]:
    """Evaluators of a workdir whose `predictions.npz` (or report) is missing."""
    config = load_config(workdir)
    return [
        n
        for n in _evaluator_names(config)
        if not all(
            os.path.isfile(os.path.join(workdir, "eval", n, f))
            for f in ("summary.json", "per_case.csv", PREDICTIONS_FILE)
        )
    ]


def evaluate_checkpoint(workdir: str) -> None:
    """Evaluates the workdir's last checkpoint on every evaluator with predictions saved
    (`train.evaluate_only`, i.e. `--mode=eval`): rewrites eval/ and summary.json."""
    from puseg_jax import train

    config = load_config(workdir)
    config.eval.save_predictions = True
    train.evaluate_only(config, workdir)


def open_workdir(workdir: str, evaluate_if_missing: bool = False) -> Workdir:
    """Opens a workdir for inspection.

    Args:
      workdir: a training workdir.
      evaluate_if_missing: when some evaluator lacks its saved predictions (a run with
        `eval.save_predictions=False`, or one stopped before its final evaluation), evaluate the
        checkpoint first (needs JAX and the data); otherwise raise.

    Returns:
      The `Workdir`.
    """
    config = load_config(workdir)
    missing = missing_predictions(workdir)
    if missing and evaluate_if_missing:
        print(f"[inspect] {workdir}: no saved predictions for {missing}; evaluating the checkpoint")
        evaluate_checkpoint(workdir)
        missing = missing_predictions(workdir)
    if missing:
        raise FileNotFoundError(
            f"{workdir}: eval/<name>/{PREDICTIONS_FILE} missing for {missing}; pass "
            "evaluate_if_missing=True (command line: --evaluate_if_missing) to evaluate the "
            "checkpoint"
        )
    evals = {}
    for name in _evaluator_names(config):
        with open(os.path.join(workdir, "eval", name, "summary.json")) as f:
            evals[name] = json.load(f)
    order = sorted(evals, key=lambda n: evals[n]["role"] != "source_val")  # stable
    evals = {n: evals[n] for n in order}
    return Workdir(workdir, config, get_dataset_info(config.data.name), evals)


def default_domain(wd: Workdir) -> str:
    """`$PUSEG_DOMAIN` if set, else the first target domain (the unseen scanner), else the first
    evaluator."""
    name = os.environ.get("PUSEG_DOMAIN")
    if name:
        if name not in wd.evals:
            raise ValueError(f"PUSEG_DOMAIN={name!r}: not one of {wd.eval_names}")
        return name
    targets = [n for n in wd.evals if wd.role(n) == "target"]
    return (targets or wd.eval_names)[0]


def load_predictions(wd: Workdir, name: str) -> dict[str, np.ndarray]:
    """An evaluator's saved predictions under the names `evaluation.predict_split` uses.

    The file stores float16; arrays come back as float32. Masks recomputed from them can differ
    from the scored ones on pixels within float16 rounding of the threshold; the Dice shown
    everywhere is the scored one (per_case.csv).

    Returns:
      {'image' [N, H, W, C], 'mask' [N, H, W] class indices, 'probs' [N, H, W, K],
      'uncertainty' [N, H, W], 'case_id' [N], 'slice_index' [N]}.
    """
    with np.load(os.path.join(wd.eval_dir(name), PREDICTIONS_FILE)) as z:
        return {
            "image": z["image"].astype(np.float32),
            "mask": z["label"],
            "probs": z["probability"].astype(np.float32),
            "uncertainty": z["uncertainty"].astype(np.float32),
            "case_id": z["case_id"],
            "slice_index": z["slice_index"],
        }


def load_all_predictions(wd: Workdir) -> dict[str, dict[str, np.ndarray]]:
    """`load_predictions` of every evaluator, by name."""
    return {n: load_predictions(wd, n) for n in wd.eval_names}


def _number(x) -> float:
    """A JSON or CSV number; evaluation writes undefined values (NaN) as null / empty."""
    if x is None or x in ("", "None", "null"):
        return float("nan")
    return float(x)


def load_per_case(wd: Workdir, name: str) -> dict[str, dict[str, dict]]:
    """per_case.csv as {case_id: {structure: {dice, hd95, asd, empty_pred, empty_gt}}}."""
    out: dict[str, dict[str, dict]] = {}
    with open(os.path.join(wd.eval_dir(name), "per_case.csv"), newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["case_id"], {})[row["structure"]] = {
                "dice": _number(row["dice"]),
                "hd95": _number(row["hd95"]),
                "asd": _number(row["asd"]),
                "empty_pred": row["empty_pred"] == "True",
                "empty_gt": row["empty_gt"] == "True",
            }
    return out


def mean_case_dice(per_case: dict[str, dict[str, dict]]) -> dict[str, float]:
    """Mean Dice over structures, per case."""
    return {c: float(np.mean([s["dice"] for s in row.values()])) for c, row in per_case.items()}


def case_uncertainty(pred: dict[str, np.ndarray], info: DatasetInfo) -> dict[str, float]:
    """Mean pixel uncertainty of each case (all its pixels, all its slices).

    Inputs are the network's fixed size, so this is the uncertain area of a case in units of
    the image: a case-level flag that needs no label.
    """
    return {
        c: float(pred["uncertainty"][idx].mean())
        for c, idx in evaluation.group_cases(pred, info.volumetric)
    }


def select_cases(
    pred: dict[str, np.ndarray],
    per_case: dict[str, dict[str, dict]],
    info: DatasetInfo,
    num: int,
    order: str = "first",
) -> list[tuple[str, np.ndarray]]:
    """Picks cases to show.

    Args:
      pred: an evaluator's predictions (`load_predictions`).
      per_case: its per-case metrics (`load_per_case`).
      info: the dataset family.
      num: how many.
      order: 'first' (the split's order, as panels and TensorBoard), 'worst' / 'best' (mean Dice
        over structures), 'most_uncertain' (`case_uncertainty`).

    Returns:
      (case_id, example indices in slice order), as `evaluation.group_cases`.
    """
    cases = evaluation.group_cases(pred, info.volumetric)
    if order == "first":
        return cases[:num]
    if order in ("worst", "best"):
        dice = mean_case_dice(per_case)
        ranked = sorted(cases, key=lambda c: dice[c[0]], reverse=order == "best")
    elif order == "most_uncertain":
        u = case_uncertainty(pred, info)
        ranked = sorted(cases, key=lambda c: -u[c[0]])
    else:
        raise ValueError(f"Unknown order {order!r}: first | worst | best | most_uncertain")
    return ranked[:num]


def dice_text(per_case: dict[str, dict[str, dict]], case_id: str) -> str:
    """'OD 0.912, OC 0.804' for a case."""
    return ", ".join(f"{s} {m['dice']:.3f}" for s, m in per_case[case_id].items())


# ---------------------------------------------------------------------------------------------
# Figures.


def save_figure(fig: Figure, path: str, dpi: int = 100) -> str:
    """Saves a figure as PNG (`.png` added when missing) and returns the path."""
    if not path.endswith(".png"):
        path += ".png"
    fig.savefig(path, dpi=dpi)
    return path


def cases_figure(
    wd: Workdir,
    name: str,
    pred: dict[str, np.ndarray],
    per_case: dict[str, dict[str, dict]],
    cases: Sequence[tuple[str, np.ndarray]],
) -> Figure:
    """One row per case: image | ground truth | prediction | uncertainty | errors, with the
    case's Dice; for volumes the slice with the largest ground-truth area.

    Args:
      wd: the workdir.
      name: the evaluator.
      pred: its predictions (`load_predictions`).
      per_case: its per-case metrics (`load_per_case`).
      cases: from `select_cases`.

    Returns:
      The figure (also the command line's contact sheet).
    """
    n = len(cases)
    if n == 0:
        raise ValueError(f"{name}: no cases to show")
    fig = Figure(figsize=(5 * TILE_INCHES + 1.5, n * TILE_INCHES + 1.0), layout="constrained")
    axes = np.asarray(fig.subplots(n, 5, squeeze=False))
    for r, (case_id, idx) in enumerate(cases):
        arrays = evaluation.case_arrays(pred, idx, wd.info, wd.config)
        j = panels.representative_slice(arrays["gt"])
        tiles = panels.panel_tiles(
            arrays["image"][j], arrays["gt"][:, j], arrays["pred"][:, j], arrays["uncertainty"][j]
        )
        panels.tile_row(axes[r], tiles, panels.TILE_TITLES if r == 0 else None)
        where = f" (slice {j})" if wd.info.volumetric else ""
        axes[r, 0].set_ylabel(f"{case_id}{where}\nDice {dice_text(per_case, case_id)}", fontsize=8)
    fig.suptitle(f"{wd.method} on {name} ({wd.role(name)})")
    panels.add_scale_and_legend(fig, axes, wd.info.structures)
    return fig


def volume_slices(arrays: dict[str, np.ndarray], max_slices: int = 12) -> list[int]:
    """Slices worth showing: those with ground truth or prediction, at most `max_slices`
    evenly spread (all slices when the volume has no foreground at all)."""
    fg = (arrays["gt"] | arrays["pred"]).any(axis=(0, 2, 3))
    slices = np.flatnonzero(fg) if fg.any() else np.arange(fg.size)
    if len(slices) > max_slices:
        slices = slices[np.round(np.linspace(0, len(slices) - 1, max_slices)).astype(int)]
    return [int(s) for s in slices]


def slice_grid_figure(
    wd: Workdir,
    name: str,
    pred: dict[str, np.ndarray],
    per_case: dict[str, dict[str, dict]],
    case_id: str,
    slices: Sequence[int] | None = None,
    max_slices: int = 12,
) -> Figure:
    """The panels of several slices of one volume, one row per slice, with each slice's 2-D
    Dice (for orientation only: the case's score is its 3-D Dice, in the title).

    Args:
      wd: the workdir.
      name: the evaluator.
      pred: its predictions.
      per_case: its per-case metrics.
      case_id: the case.
      slices: slice indices; default `volume_slices(..., max_slices)`.
      max_slices: see `volume_slices`.

    Returns:
      The figure.
    """
    cases = dict(evaluation.group_cases(pred, wd.info.volumetric))
    if case_id not in cases:
        raise ValueError(f"{name}: no case {case_id!r}")
    arrays = evaluation.case_arrays(pred, cases[case_id], wd.info, wd.config)
    if slices is None:
        slices = volume_slices(arrays, max_slices)
    n = len(slices)
    fig = Figure(figsize=(5 * TILE_INCHES + 1.5, n * TILE_INCHES + 1.0), layout="constrained")
    axes = np.asarray(fig.subplots(n, 5, squeeze=False))
    for r, j in enumerate(slices):
        gt, pm = arrays["gt"][:, j], arrays["pred"][:, j]
        tiles = panels.panel_tiles(arrays["image"][j], gt, pm, arrays["uncertainty"][j])
        panels.tile_row(axes[r], tiles, panels.TILE_TITLES if r == 0 else None)
        slice_dice = ", ".join(
            f"{s} {metrics.compute_dice(pm[k], gt[k]):.2f}"
            for k, s in enumerate(wd.info.structures)
        )
        axes[r, 0].set_ylabel(f"slice {j}\n{slice_dice}", fontsize=8)
    fig.suptitle(
        f"{wd.method} on {name}: {case_id}, {arrays['gt'].shape[1]} slices, "
        f"3-D Dice {dice_text(per_case, case_id)}"
    )
    panels.add_scale_and_legend(fig, axes, wd.info.structures)
    return fig


def boundary_band(mask: np.ndarray, info: DatasetInfo, width: float) -> np.ndarray:
    """Pixels within `width` of the boundary of any ground-truth structure, per 2-D slice: the
    band of `evaluation.uncertainty_quality`'s u_boundary (the rest is its u_interior)."""
    band = np.zeros(mask.shape, bool)
    for s in evaluation.gt_structures(mask, info):
        band |= metrics.boundary_band(s, width)
    return band


def boundary_histogram_figure(
    wd: Workdir, preds: dict[str, dict[str, np.ndarray]], bins: int = 40
) -> Figure:
    """Histograms of pixel uncertainty near the ground-truth boundary versus elsewhere, one
    panel per evaluator (the band is `config.eval.boundary_width` pixels on each side).

    Args:
      wd: the workdir.
      preds: predictions by evaluator name (`load_all_predictions`).
      bins: histogram bins over [0, 1].

    Returns:
      The figure.
    """
    width = wd.config.eval.boundary_width
    names = list(preds)
    fig = Figure(figsize=(3.6 * len(names), 3.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(names), sharey=True))
    edges = np.linspace(0, 1, bins + 1)
    for ax, name in zip(axes, names, strict=True):
        pred = preds[name]
        band = boundary_band(pred["mask"], wd.info, width)
        u = pred["uncertainty"]
        for sel, label, colour in ((band, "boundary", "C3"), (~band, "elsewhere", "C0")):
            if sel.any():
                ax.hist(
                    u[sel],
                    edges,
                    density=True,
                    histtype="step",
                    lw=1.8,
                    color=colour,
                    label=f"{label}: mean {u[sel].mean():.3f}",
                )
        ax.set_yscale("log")
        ax.set_xlabel("pixel uncertainty")
        ax.set_title(f"{name} ({wd.role(name)})", fontsize=10)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("density")
    fig.suptitle(f"{wd.method}: uncertainty within {width} px of the boundary vs elsewhere")
    return fig


def reliability_figure(wd: Workdir) -> Figure:
    """Reliability diagram of every evaluator (bins from eval/<name>/summary.json): accuracy
    against confidence, the diagonal being perfect calibration, and the pixel count per bin.

    Returns:
      The figure.
    """
    fig = Figure(figsize=(5.0, 6.0), layout="constrained")
    ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="calibrated")
    for k, (name, ev) in enumerate(wd.evals.items()):
        unc = ev.get("uncertainty")
        if not unc:
            continue
        rel = unc["reliability"]
        conf = np.asarray(rel["bin_confidence"], float)
        acc = np.asarray(rel["bin_accuracy"], float)
        counts = np.asarray(rel["bin_counts"], float)
        edges = np.asarray(rel["bin_edges"], float)
        ok = counts > 0
        style = "-" if ev["role"] == "target" else ":"
        marker = ROLE_MARKERS.get(ev["role"], "o")
        ax.plot(
            conf[ok],
            acc[ok],
            style,
            marker=marker,
            color=f"C{k}",
            label=f"{name} ({ev['role']}), ECE {_number(unc['ece']):.4f}",
        )
        centres = (edges[:-1] + edges[1:]) / 2
        ax_n.step(centres, np.where(ok, counts, np.nan), where="mid", color=f"C{k}")
    ax.set_ylabel("pixel accuracy")
    ax.set_title(f"{wd.method}: reliability")
    ax.legend(fontsize=8)
    ax_n.set_yscale("log")
    ax_n.set_xlabel("confidence")
    ax_n.set_ylabel("pixels")
    ax.set_xlim(0, 1)
    return fig


def dice_vs_uncertainty_figure(
    wds: Workdir | Sequence[Workdir],
    preds: dict[str, dict[str, dict[str, np.ndarray]]] | None = None,
) -> Figure:
    """Per-case Dice against the case's mean uncertainty, for every evaluator of one or more
    workdirs; colour by domain, marker by role (source circle, target cross), one panel per
    structure and workdir. Spearman's rho over all cases of a panel is in its title.

    Args:
      wds: a workdir, or several (e.g. erm and ours).
      preds: {workdir path: {name: predictions}} already loaded; loaded when missing.

    Returns:
      The figure.
    """
    from scipy import stats

    wds = [wds] if isinstance(wds, Workdir) else list(wds)
    structures = wds[0].info.structures
    fig = Figure(figsize=(3.6 * len(structures) + 1.5, 3.3 * len(wds)), layout="constrained")
    axes = np.asarray(fig.subplots(len(wds), len(structures), squeeze=False, sharex=True))
    for r, wd in enumerate(wds):
        loaded = (preds or {}).get(wd.path) or load_all_predictions(wd)
        for c, structure in enumerate(structures):
            ax = axes[r, c]
            xs, ys = [], []
            for k, name in enumerate(wd.eval_names):
                per_case = load_per_case(wd, name)
                u = case_uncertainty(loaded[name], wd.info)
                x = [u[case] for case in per_case]
                y = [per_case[case][structure]["dice"] for case in per_case]
                role = wd.role(name)
                ax.scatter(
                    x,
                    y,
                    s=22,
                    color=f"C{k}",
                    marker=ROLE_MARKERS.get(role, "o"),
                    label=f"{name} ({role})",
                    alpha=0.8,
                )
                xs += x
                ys += y
            rho = stats.spearmanr(xs, ys).statistic if len(set(xs)) > 1 else float("nan")
            ax.set_title(f"{wd.method}, {structure}: Spearman rho {rho:.2f}", fontsize=10)
            ax.set_ylabel("case Dice")
            finite = [y for y in ys if np.isfinite(y)]
            ax.set_ylim(max(-0.02, min(finite, default=0.0) - 0.05), 1.02)
            ax.xaxis.set_major_locator(MaxNLocator(4))
            if r == len(wds) - 1:
                ax.set_xlabel("case mean uncertainty")
        axes[r, -1].legend(fontsize=7, loc="lower left")
    return fig


def compare_figure(
    wd_a: Workdir, wd_b: Workdir, name: str, case_ids: Sequence[str] | None = None, num: int = 3
) -> Figure:
    """The same cases under two runs side by side (e.g. erm and ours): image | ground truth,
    then prediction | uncertainty | errors of each run, with each run's Dice.

    Args:
      wd_a: the first run (left).
      wd_b: the second run (right); must have evaluated `name` on the same cases.
      name: the evaluator.
      case_ids: cases to show; default the `num` worst of `wd_a` (where a fix would show).
      num: cases when `case_ids` is None.

    Returns:
      The figure.
    """
    pred_a, pred_b = load_predictions(wd_a, name), load_predictions(wd_b, name)
    pc_a, pc_b = load_per_case(wd_a, name), load_per_case(wd_b, name)
    cases_a = dict(evaluation.group_cases(pred_a, wd_a.info.volumetric))
    cases_b = dict(evaluation.group_cases(pred_b, wd_b.info.volumetric))
    if set(cases_a) != set(cases_b):
        raise ValueError(f"{name}: {wd_a.path} and {wd_b.path} evaluated different cases")
    if case_ids is None:
        case_ids = [c for c, _ in select_cases(pred_a, pc_a, wd_a.info, num, "worst")]
    n = len(case_ids)
    # Each row carries three lines of tile titles above its tiles.
    height = n * (TILE_INCHES + 0.5) + 1.0
    fig = Figure(figsize=(8 * TILE_INCHES + 2.0, height), layout="constrained")
    axes = np.asarray(fig.subplots(n, 8, squeeze=False))
    for r, case_id in enumerate(case_ids):
        a = evaluation.case_arrays(pred_a, cases_a[case_id], wd_a.info, wd_a.config)
        b = evaluation.case_arrays(pred_b, cases_b[case_id], wd_b.info, wd_b.config)
        j = panels.representative_slice(a["gt"])
        ta = panels.panel_tiles(a["image"][j], a["gt"][:, j], a["pred"][:, j], a["uncertainty"][j])
        tb = panels.panel_tiles(b["image"][j], b["gt"][:, j], b["pred"][:, j], b["uncertainty"][j])
        # Every tile is titled and the Dice sits in the prediction tiles' titles: a rotated row
        # label of case, methods and Dice overflowed into the next row for long method names.
        where = f", slice {j}" if wd_a.info.volumetric else ""
        titles = [f"{case_id}{where}\nimage", "ground truth"]
        for wd, pc in ((wd_a, pc_a), (wd_b, pc_b)):
            titles += [
                f"{wd.method}\nprediction\nDice {dice_text(pc, case_id)}",
                f"{wd.method}\nuncertainty",
                f"{wd.method}\nerrors",
            ]
        panels.tile_row(axes[r], ta[:2] + ta[2:] + tb[2:], titles, fontsize=8)
    fig.suptitle(f"{name} ({wd_a.role(name)}): {wd_a.method} vs {wd_b.method}")
    panels.add_scale_and_legend(fig, axes, wd_a.info.structures)
    return fig


def uncertainty_table(wds: Workdir | Sequence[Workdir]) -> str:
    """Markdown table of the uncertainty metrics of every evaluator of one or more workdirs,
    with the mean Dice over structures."""
    wds = [wds] if isinstance(wds, Workdir) else list(wds)
    keys = ("ece", "brier", "nll", "auroc_error", "u_boundary", "u_interior", "u_boundary_ratio")
    lines = [
        "| method | domain | role | mean Dice | " + " | ".join(keys) + " |",
        "|" + "---|" * (4 + len(keys)),
    ]
    for wd in wds:
        for name, ev in wd.evals.items():
            dice = np.mean([_number(ev["structures"][s]["dice"]["mean"]) for s in ev["structures"]])
            unc = ev.get("uncertainty", {})
            cells = " | ".join(f"{_number(unc.get(k)):.4f}" for k in keys)
            lines.append(f"| {wd.method} | {name} | {ev['role']} | {dice:.4f} | {cells} |")
    return "\n".join(lines)
