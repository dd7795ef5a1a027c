"""PNG panels of predictions: image, ground truth, prediction, uncertainty, errors.

Panels are built from the arrays evaluation saves (`eval/<name>/predictions.npz`), so the
command line, TensorBoard and the notebook show the same pictures. As a tool:

    python -m puseg_jax.visualize --workdir W --domain D --out DIR [--cases N]

writes, per domain, one PNG panel per case (`panel_<i>_<case>.png`, as evaluation writes them),
a contact sheet of those cases with their Dice (`contact_sheet.png`) and, for volumes, a grid
over the slices of each case (`slices_<case>.png`). See `main` for every option.
"""

import argparse
import os
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from PIL import Image

# Colours of structures 1..S in label overlays, and of false positives / false negatives.
STRUCTURE_COLOURS = np.array([[0.1, 0.8, 0.2], [1.0, 0.85, 0.1], [0.2, 0.5, 1.0]])
FP_COLOUR = np.array([1.0, 0.2, 0.2])
FN_COLOUR = np.array([0.2, 0.6, 1.0])
UNCERTAINTY_CMAP = "magma"
# Column titles of a panel's tiles, in order.
TILE_TITLES = ("image", "ground truth", "prediction", "uncertainty", "errors (FP red, FN blue)")


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Normalised network input [H, W, C] -> display RGB in [0, 1] (middle channel for 2.5-D
    grey stacks, per-image min-max)."""
    image = np.asarray(image, np.float32)
    if image.shape[-1] == 3:
        rgb = image
    else:
        rgb = np.repeat(image[..., image.shape[-1] // 2 : image.shape[-1] // 2 + 1], 3, axis=-1)
    lo, hi = np.percentile(rgb, 1), np.percentile(rgb, 99)
    return np.clip((rgb - lo) / max(hi - lo, 1e-6), 0, 1)


def overlay(rgb: np.ndarray, structures: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blends structure masks [S, H, W] (nested or exclusive) over an RGB image."""
    out = rgb.copy()
    for s, m in enumerate(structures):
        c = STRUCTURE_COLOURS[s % len(STRUCTURE_COLOURS)]
        out[m] = (1 - alpha) * out[m] + alpha * c
    return out


def heatmap(u: np.ndarray, cmap: str = UNCERTAINTY_CMAP) -> np.ndarray:
    """Uncertainty in [0, 1] -> RGB with a fixed scale (comparable across cases and runs)."""
    return colormaps[cmap](np.clip(np.asarray(u, np.float32), 0, 1))[..., :3]


def error_map(rgb: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """False positives and false negatives of any structure in two colours over a dim image."""
    out = 0.4 * rgb
    fp = np.any(pred & ~gt, axis=0)
    fn = np.any(~pred & gt, axis=0)
    out[fp] = FP_COLOUR
    out[fn] = FN_COLOUR
    return out


def panel_tiles(
    image: np.ndarray, gt_structs: np.ndarray, pred_structs: np.ndarray, uncertainty: np.ndarray
) -> list[np.ndarray]:
    """The five tiles of a panel, in the order of `TILE_TITLES`.

    Args:
      image: normalised network input [H, W, C].
      gt_structs: ground-truth structure masks [S, H, W] (bool).
      pred_structs: predicted structure masks [S, H, W] (bool).
      uncertainty: [H, W] in [0, 1].

    Returns:
      Five float32 RGB arrays [H, W, 3] in [0, 1].
    """
    rgb = to_rgb(image)
    tiles = [
        rgb,
        overlay(rgb, gt_structs),
        overlay(rgb, pred_structs),
        heatmap(uncertainty),
        error_map(rgb, pred_structs, gt_structs),
    ]
    return [t.astype(np.float32) for t in tiles]


def make_panel(image, gt_structs, pred_structs, uncertainty, gap: int = 2) -> np.ndarray:
    """[H, 5W] RGB: image | ground truth | prediction | uncertainty | errors."""
    tiles = panel_tiles(image, gt_structs, pred_structs, uncertainty)
    sep = np.ones((tiles[0].shape[0], gap, 3), np.float32)
    parts = []
    for t in tiles:
        parts += [t, sep]
    return np.concatenate(parts[:-1], axis=1)


def save_png(panel: np.ndarray, path: str, scale: int = 2) -> None:
    """Writes an RGB array in [0, 1] as PNG, enlarged `scale` times (nearest neighbour)."""
    img = Image.fromarray((np.clip(panel, 0, 1) * 255).astype(np.uint8))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def case_arrays(
    pred: dict[str, np.ndarray], idx: np.ndarray, info, config
) -> dict[str, np.ndarray]:
    """The arrays of one case, post-processed as evaluation scores them.

    Args:
      pred: predictions of a domain (keys of `evaluation.predict_split`: image, mask, probs,
        uncertainty, ...).
      idx: the case's example indices in slice order (from `evaluation.group_cases`).
      info: the dataset's `DatasetInfo`.
      config: the run's config (threshold, largest component).

    Returns:
      {'image': [D, H, W, C], 'gt': [S, D, H, W], 'pred': [S, D, H, W], 'uncertainty':
      [D, H, W]}, with D = 1 for 2-D cases. Volumes are post-processed in 3-D, like the metrics.
    """
    from puseg_jax import evaluation

    probs = pred["probs"][idx]
    if info.volumetric:
        pm = evaluation.structure_masks(probs, info, config)
    else:
        pm = evaluation.structure_masks(probs[0], info, config)[:, None]
    return {
        "image": pred["image"][idx],
        "gt": evaluation.gt_structures(pred["mask"][idx], info),
        "pred": pm,
        "uncertainty": pred["uncertainty"][idx],
    }


def representative_slice(gt: np.ndarray) -> int:
    """The slice of a case [S, D, H, W] with the largest ground-truth area (0 for 2-D cases)."""
    return int(np.argmax(gt.reshape(gt.shape[0], gt.shape[1], -1).sum(axis=(0, 2))))


def case_panel(arrays: dict[str, np.ndarray], j: int) -> np.ndarray:
    """The panel of slice `j` of a case given by `case_arrays`."""
    return make_panel(
        arrays["image"][j], arrays["gt"][:, j], arrays["pred"][:, j], arrays["uncertainty"][j]
    )


def panels_for_domain(pred, rows, info, config, num: int) -> list[tuple[str, np.ndarray]]:
    """Panels for the first `num` cases (fixed, so runs and steps are comparable); for volumes
    the slice with the largest ground-truth area."""
    del rows  # the panels show masks; Dice goes in titles elsewhere
    from puseg_jax import evaluation

    out = []
    for case_id, idx in evaluation.group_cases(pred, info.volumetric)[:num]:
        arrays = case_arrays(pred, idx, info, config)
        out.append((case_id, case_panel(arrays, representative_slice(arrays["gt"]))))
    return out


def write_tensorboard(
    writer,
    step: int,
    name: str,
    pred,
    info,
    config,
    num: int,
    png_dir: str | None = None,
) -> None:
    """TensorBoard images of the first `num` cases (fixed, so steps are comparable) and the
    histogram of the uncertainty of every pixel of the split; with `png_dir`, the same panels
    also as `panel_<i>_<case_id>.png` files there.

    Args:
      writer: a `logging_utils.MetricWriter`.
      step: training step.
      name: the evaluator's name; tags are `eval/<name>/panel_<i>` and
        `eval/<name>/uncertainty_hist`.
      pred: predictions of the split (keys of `evaluation.predict_split`).
      info: the dataset's `DatasetInfo`.
      config: the run's config.
      num: number of cases shown.
      png_dir: also save the panels as PNG files in this folder.
    """
    for i, (case_id, panel) in enumerate(panels_for_domain(pred, None, info, config, num)):
        if png_dir is not None:
            save_png(panel, os.path.join(png_dir, f"panel_{i}_{case_id}.png"))
        writer.image(step, f"eval/{name}/panel_{i}", panel)
    writer.histogram(step, f"eval/{name}/uncertainty_hist", pred["uncertainty"])


# ---------------------------------------------------------------------------------------------
# Command line.


def write_domain_pngs(
    wd,
    name: str,
    out_dir: str,
    num_cases: int,
    order: str = "first",
    compare=None,
) -> list[str]:
    """Writes the PNGs of one evaluated domain of a workdir into `out_dir/<name>/`.

    Args:
      wd: an `inspect_utils.Workdir`.
      name: the evaluator (eval/<name>).
      out_dir: output folder.
      num_cases: cases shown (panels and contact sheet).
      order: which cases, see `inspect_utils.select_cases`.
      compare: another `Workdir` (e.g. the 'erm' run); adds `compare_<method>.png` with the
        same cases under both runs.

    Returns:
      The paths written.
    """
    from puseg_jax import inspect_utils

    dest = os.path.join(out_dir, name)
    os.makedirs(dest, exist_ok=True)
    pred = inspect_utils.load_predictions(wd, name)
    per_case = inspect_utils.load_per_case(wd, name)
    cases = inspect_utils.select_cases(pred, per_case, wd.info, num_cases, order)
    written = []
    for i, (case_id, idx) in enumerate(cases):
        arrays = case_arrays(pred, idx, wd.info, wd.config)
        path = os.path.join(dest, f"panel_{i}_{case_id}.png")
        save_png(case_panel(arrays, representative_slice(arrays["gt"])), path)
        written.append(path)
        if wd.info.volumetric:
            fig = inspect_utils.slice_grid_figure(wd, name, pred, per_case, case_id)
            written.append(inspect_utils.save_figure(fig, os.path.join(dest, f"slices_{case_id}")))
    fig = inspect_utils.cases_figure(wd, name, pred, per_case, cases)
    written.append(inspect_utils.save_figure(fig, os.path.join(dest, "contact_sheet")))
    if compare is not None:
        fig = inspect_utils.compare_figure(compare, wd, name, [c for c, _ in cases])
        path = os.path.join(dest, f"compare_{compare.method}_{wd.method}")
        written.append(inspect_utils.save_figure(fig, path))
    return written


def main(argv: Sequence[str] | None = None) -> list[str]:
    """`python -m puseg_jax.visualize`: PNG panels and a contact sheet from a workdir.

    Args:
      argv: command-line arguments (None: sys.argv[1:]).

    Returns:
      The paths written.
    """
    parser = argparse.ArgumentParser(
        prog="python -m puseg_jax.visualize",
        description="Writes PNG panels (image | ground truth | prediction | uncertainty | "
        "errors) and a contact sheet per evaluated domain of a workdir.",
    )
    parser.add_argument("--workdir", required=True, help="a training workdir")
    parser.add_argument(
        "--domain",
        action="append",
        help="evaluator name (eval/<name>); repeat for several; default: every evaluated one",
    )
    parser.add_argument("--out", required=True, help="output folder (one subfolder per domain)")
    parser.add_argument("--cases", type=int, default=4, help="cases per domain (default 4)")
    parser.add_argument(
        "--order",
        default="first",
        choices=("first", "worst", "best", "most_uncertain"),
        help="which cases: the first ones (as in TensorBoard), the lowest or highest Dice, or "
        "the highest mean uncertainty",
    )
    parser.add_argument(
        "--compare",
        default="",
        help="a second workdir of the same data (e.g. the erm run): adds a side-by-side figure",
    )
    parser.add_argument(
        "--evaluate_if_missing",
        action="store_true",
        help="evaluate the checkpoint first when predictions.npz is missing (needs the data)",
    )
    args = parser.parse_args(argv)

    from puseg_jax import inspect_utils

    wd = inspect_utils.open_workdir(args.workdir, evaluate_if_missing=args.evaluate_if_missing)
    other = None
    if args.compare:
        other = inspect_utils.open_workdir(
            args.compare, evaluate_if_missing=args.evaluate_if_missing
        )
    names = args.domain or wd.eval_names
    written = []
    for name in names:
        written += write_domain_pngs(wd, name, args.out, args.cases, args.order, other)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
