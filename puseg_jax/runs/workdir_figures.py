"""The notebook's figures of a trained workdir: cases, slices of a volume, boundary
uncertainty, reliability, Dice against uncertainty, two runs side by side."""

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from puseg_jax import metrics
from puseg_jax.core.formatting import number, to_float
from puseg_jax.drawing import panels
from puseg_jax.drawing.figures import TILE_INCHES, volume_slices
from puseg_jax.evaluators import case_panels, scoring
from puseg_jax.evaluators.records import PerCase, Predictions
from puseg_jax.runs.workdir import (
    Workdir,
    case_uncertainty,
    load_all_predictions,
    load_per_case,
    load_predictions,
    select_cases,
)

ROLE_MARKERS = {"source_val": "o", "target": "X"}


def _dice_text(per_case: PerCase, case_id: str) -> str:
    """'OD 0.912, OC 0.804': a case's scored Dice, as the evaluation's panels show it."""
    return panels.dice_text({s: m["dice"] for s, m in per_case[case_id].items()})


def cases_figure(
    wd: Workdir,
    name: str,
    pred: Predictions,
    per_case: PerCase,
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
        arrays = case_panels.case_arrays(pred, idx, wd.info, wd.config)
        j = panels.representative_slice(arrays["gt"])
        tiles = panels.panel_tiles(
            arrays["image"][j], arrays["gt"][:, j], arrays["pred"][:, j], arrays["uncertainty"][j]
        )
        panels.tile_row(axes[r], tiles, panels.TILE_TITLES if r == 0 else None)
        where = f" (slice {j})" if wd.info.volumetric else ""
        axes[r, 0].set_ylabel(f"{case_id}{where}\nDice {_dice_text(per_case, case_id)}", fontsize=8)
    fig.suptitle(f"{wd.method} on {name} ({wd.role(name)})")
    panels.add_scale_and_legend(fig, axes, wd.info.structures)
    return fig


def slice_grid_figure(
    wd: Workdir,
    name: str,
    pred: Predictions,
    per_case: PerCase,
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
    cases = dict(scoring.group_cases(pred, wd.info.volumetric))
    if case_id not in cases:
        raise ValueError(f"{name}: no case {case_id!r}")
    arrays = case_panels.case_arrays(pred, cases[case_id], wd.info, wd.config)
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
        f"3-D Dice {_dice_text(per_case, case_id)}"
    )
    panels.add_scale_and_legend(fig, axes, wd.info.structures)
    return fig


def boundary_histogram_figure(wd: Workdir, preds: dict[str, Predictions], bins: int = 40) -> Figure:
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
        band = scoring.structures_band(pred.label, wd.info, width)
        u = pred.uncertainty
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
            label=f"{name} ({ev['role']}), ECE {number(to_float(unc['ece']), '.4f')}",
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
    preds: dict[str, dict[str, Predictions]] | None = None,
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
    cases_a = dict(scoring.group_cases(pred_a, wd_a.info.volumetric))
    cases_b = dict(scoring.group_cases(pred_b, wd_b.info.volumetric))
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
        a = case_panels.case_arrays(pred_a, cases_a[case_id], wd_a.info, wd_a.config)
        b = case_panels.case_arrays(pred_b, cases_b[case_id], wd_b.info, wd_b.config)
        j = panels.representative_slice(a["gt"])
        ta = panels.panel_tiles(a["image"][j], a["gt"][:, j], a["pred"][:, j], a["uncertainty"][j])
        tb = panels.panel_tiles(b["image"][j], b["gt"][:, j], b["pred"][:, j], b["uncertainty"][j])
        # Every tile is titled and the Dice sits in the prediction tiles' titles: a rotated row
        # label of case, methods and Dice overflowed into the next row for long method names.
        where = f", slice {j}" if wd_a.info.volumetric else ""
        titles = [f"{case_id}{where}\nimage", "ground truth"]
        for wd, pc in ((wd_a, pc_a), (wd_b, pc_b)):
            titles += [
                f"{wd.method}\nprediction\nDice {_dice_text(pc, case_id)}",
                f"{wd.method}\nuncertainty",
                f"{wd.method}\nerrors",
            ]
        panels.tile_row(axes[r], ta[:2] + ta[2:] + tb[2:], titles, fontsize=8)
    fig.suptitle(f"{name} ({wd_a.role(name)}): {wd_a.method} vs {wd_b.method}")
    panels.add_scale_and_legend(fig, axes, wd_a.info.structures)
    return fig
