"""Drawing prediction panels: image, ground truth, prediction, uncertainty, errors.

A leaf of the package (numpy, matplotlib and PIL only): evaluation draws the panels it writes
(`eval/<name>/panel_*.png` and the TensorBoard images) with `draw_panel`, and the notebook
helpers (`runs.workdir_figures`) and `python -m puseg_jax.visualize` build their figures from
the same tiles, colours, legend and colour bar. Nothing here knows about configs, datasets or
JAX: a case arrives as arrays and text.
"""

import os
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

# Colours of structures 1..S in label overlays, and of false positives / false negatives.
STRUCTURE_COLOURS = np.array([[0.1, 0.8, 0.2], [1.0, 0.85, 0.1], [0.2, 0.5, 1.0]])
FP_COLOUR = np.array([1.0, 0.2, 0.2])
FN_COLOUR = np.array([0.2, 0.6, 1.0])
UNCERTAINTY_CMAP = "magma"
# Column titles of a panel's tiles, in order.
TILE_TITLES = ("image", "ground truth", "prediction", "uncertainty", "errors (FP red, FN blue)")
# The tiles of a case without labels (nothing to compare the prediction with).
UNLABELLED_TILE_TITLES = ("image", "prediction", "uncertainty")
# Smallest side of a tile in a drawn panel; smaller images are enlarged by an integer factor
# (nearest neighbour, so every network pixel stays a visible square).
MIN_TILE_PX = 256

# Panel geometry in pixels at DPI (the figure is laid out by hand: constrained layout would cost
# more than the drawing, and TensorBoard panels are drawn at every periodic evaluation).
DPI = 100
_PIXELS_GID = "puseg_panel_pixels"
_MARGIN, _GAP, _HEADER, _TILE_TITLE, _LEGEND, _CBAR, _CBAR_LABELS = 12, 8, 52, 24, 34, 14, 58


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
    image: np.ndarray,
    gt_structs: np.ndarray | None,
    pred_structs: np.ndarray,
    uncertainty: np.ndarray,
) -> list[np.ndarray]:
    """The tiles of a panel, in the order of `TILE_TITLES` (five), or without ground truth of
    `UNLABELLED_TILE_TITLES` (three).

    Args:
      image: normalised network input [H, W, C].
      gt_structs: ground-truth structure masks [S, H, W] (bool); None for a case without labels.
      pred_structs: predicted structure masks [S, H, W] (bool).
      uncertainty: [H, W] in [0, 1].

    Returns:
      Float32 RGB arrays [H, W, 3] in [0, 1].
    """
    rgb = to_rgb(image)
    if gt_structs is None:
        tiles = [rgb, overlay(rgb, pred_structs), heatmap(uncertainty)]
    else:
        tiles = [
            rgb,
            overlay(rgb, gt_structs),
            overlay(rgb, pred_structs),
            heatmap(uncertainty),
            error_map(rgb, pred_structs, gt_structs),
        ]
    return [t.astype(np.float32) for t in tiles]


def representative_slice(gt: np.ndarray) -> int:
    """The slice of a case [S, D, H, W] with the largest ground-truth area (0 for 2-D cases)."""
    return int(np.argmax(gt.reshape(gt.shape[0], gt.shape[1], -1).sum(axis=(0, 2))))


def dice_text(dice: dict[str, float], digits: int = 3) -> str:
    """{'OD': 0.912, 'OC': 0.804} -> 'OD 0.912, OC 0.804' (undefined values as n/a)."""
    return ", ".join(
        f"{s} {d:.{digits}f}" if d is not None and np.isfinite(d) else f"{s} n/a"
        for s, d in dice.items()
    )


# ---------------------------------------------------------------------------------------------
# Figure parts shared by the panel and the notebook's figures.


def legend_handles(structures: Sequence[str], errors: bool = True) -> list[Patch]:
    """Legend entries of the overlays (one colour per structure) and, with `errors`, of the
    error map."""
    cols = STRUCTURE_COLOURS
    handles = [Patch(color=cols[s % len(cols)], label=n) for s, n in enumerate(structures)]
    if errors:
        handles += [
            Patch(color=FP_COLOUR, label="false positive"),
            Patch(color=FN_COLOUR, label="false negative"),
        ]
    return handles


def uncertainty_mappable() -> ScalarMappable:
    """The uncertainty colour scale: fixed to [0, 1], so maps compare across cases and runs."""
    return ScalarMappable(Normalize(0, 1), UNCERTAINTY_CMAP)


def tile_row(
    axes, tiles: Sequence[np.ndarray], titles: Sequence[str] | None, fontsize: float = 9
) -> None:
    """Shows one row of tiles, without ticks, with optional titles."""
    for k, (ax, tile) in enumerate(zip(axes, tiles, strict=True)):
        ax.imshow(tile, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None:
            ax.set_title(titles[k], fontsize=fontsize)


def add_scale_and_legend(fig: Figure, axes: np.ndarray, structures: Sequence[str]) -> None:
    """The uncertainty colour bar beside a grid of tiles and the overlays' legend below it
    (for figures with constrained layout)."""
    fig.colorbar(
        uncertainty_mappable(),
        ax=axes.ravel().tolist(),
        shrink=min(0.8, 3 / axes.shape[0] + 0.2),
        label="uncertainty",
    )
    fig.legend(
        handles=legend_handles(structures),
        loc="outside lower center",
        ncol=len(structures) + 2,
        fontsize=8,
        frameon=False,
    )


# ---------------------------------------------------------------------------------------------
# The panel: one case, titled, with legend and colour bar.


def display_scale(height: int, width: int, min_tile: int = MIN_TILE_PX) -> int:
    """The integer enlargement that makes the shorter side of an image at least `min_tile`."""
    return max(1, -(-min_tile // max(1, min(height, width))))


def panel_figure(
    image: np.ndarray,
    gt_structs: np.ndarray | None,
    pred_structs: np.ndarray,
    uncertainty: np.ndarray,
    structures: Sequence[str],
    title: str,
    subtitle: str = "",
    min_tile: int = MIN_TILE_PX,
) -> Figure:
    """One case as a titled figure: image | ground truth | prediction | uncertainty | errors
    (without ground truth: image | prediction | uncertainty), each tile at least `min_tile`
    pixels (nearest-neighbour enlargement, one image pixel a square of pixels), with the
    overlays' legend and the uncertainty colour bar.

    The pixels (tiles, colour bar) are composed in numpy and placed unresampled with
    `figimage`; matplotlib only sets the text. Axes would cost ten times more to draw (their
    ticks are built even when hidden), and TensorBoard panels are drawn at every periodic
    evaluation.

    Args:
      image: normalised network input [H, W, C].
      gt_structs: ground-truth structure masks [S, H, W] (bool); None for a case without
        labels.
      pred_structs: predicted structure masks [S, H, W] (bool).
      uncertainty: [H, W] in [0, 1].
      structures: the structures' names, in mask order (legend).
      title: first header line (e.g. the run, domain and step).
      subtitle: second header line (e.g. the case and its Dice).
      min_tile: smallest tile side in pixels.

    Returns:
      The figure, sized in pixels at `DPI` (render it with `render`).
    """
    tiles = panel_tiles(image, gt_structs, pred_structs, uncertainty)
    titles = TILE_TITLES if gt_structs is not None else UNLABELLED_TILE_TITLES
    h, w = tiles[0].shape[:2]
    k = display_scale(h, w, min_tile)
    th, tw = h * k, w * k
    n = len(tiles)
    width = 2 * _MARGIN + n * tw + n * _GAP + _CBAR + _CBAR_LABELS
    height = _HEADER + _TILE_TITLE + th + _LEGEND + _MARGIN
    canvas = np.ones((height, width, 3), np.float32)
    top = _HEADER + _TILE_TITLE
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)

    def text(x, y, s, **kw):  # pixels from the top-left
        fig.text(x / width, 1 - y / height, s, **kw)

    for i, (tile, name) in enumerate(zip(tiles, titles, strict=True)):
        x = _MARGIN + i * (tw + _GAP)
        canvas[top : top + th, x : x + tw] = np.repeat(np.repeat(tile, k, axis=0), k, axis=1)
        text(x + tw / 2, top - 5, name, fontsize=10, ha="center", va="bottom")
    # The colour bar: the uncertainty scale from 1 (top) to 0, framed, with ticks every 0.2.
    x = _MARGIN + n * (tw + _GAP)
    ramp = heatmap(np.linspace(1, 0, th))[:, None, :]
    canvas[top : top + th, x : x + _CBAR] = ramp
    canvas[top : top + th, [x, x + _CBAR - 1]] = 0
    canvas[[top, top + th - 1], x : x + _CBAR] = 0
    for v in np.linspace(0, 1, 6):
        y = top + (1 - v) * (th - 1)
        canvas[int(round(y)), x + _CBAR : x + _CBAR + 4] = 0
        text(x + _CBAR + 6, y, f"{v:.1f}", fontsize=8, va="center")
    text(x + _CBAR + 34, top + th / 2, "uncertainty", fontsize=9, va="center", rotation=90)
    pixels = (canvas * 255).round().astype(np.uint8)
    fig.figimage(pixels, 0, 0, origin="upper", gid=_PIXELS_GID)
    text(_MARGIN, 8, title, fontsize=12, weight="bold", va="top")
    if subtitle:
        text(_MARGIN, 30, subtitle, fontsize=10, va="top")
    fig.legend(
        handles=legend_handles(structures, errors=gt_structs is not None),
        loc="center",
        bbox_to_anchor=((_MARGIN + (n * (tw + _GAP) - _GAP) / 2) / width, (_LEGEND / 2) / height),
        ncol=len(structures) + 2,
        fontsize=9,
        frameon=False,
        handlelength=1.2,
        columnspacing=1.5,
    )
    return fig


def render(fig: Figure) -> np.ndarray:
    """A figure as an RGB uint8 array [H, W, 3] (Agg, no display needed).

    The pixel layer of a `panel_figure` is not resampled by Agg (a third of a second for a
    1400x380 panel) but laid under the rendered text in numpy: text and pixels do not overlap
    and the background is white, so their minimum is the composite.
    """
    pixels = [im for im in fig.images if im.get_gid() == _PIXELS_GID]
    for im in pixels:
        im.set_visible(False)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    out = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    for im in pixels:
        im.set_visible(True)
        np.minimum(out, im.get_array()[: out.shape[0], : out.shape[1]], out=out)
    return out


def draw_panel(
    image: np.ndarray,
    gt_structs: np.ndarray | None,
    pred_structs: np.ndarray,
    uncertainty: np.ndarray,
    structures: Sequence[str],
    title: str,
    subtitle: str = "",
) -> np.ndarray:
    """`panel_figure` rendered: the RGB uint8 array written as PNG and to TensorBoard."""
    return render(
        panel_figure(image, gt_structs, pred_structs, uncertainty, structures, title, subtitle)
    )


def save_png(panel: np.ndarray, path: str) -> None:
    """Writes an RGB array (uint8, or float in [0, 1]) as PNG."""
    panel = np.asarray(panel)
    if panel.dtype != np.uint8:
        panel = (np.clip(panel, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(panel).save(path)


def write_tensorboard(
    writer,
    step: int,
    name: str,
    panels: Sequence[tuple[str, np.ndarray]],
    uncertainty: np.ndarray,
    png_dir: str | None = None,
) -> None:
    """TensorBoard images of drawn panels and the histogram of an evaluator's pixel
    uncertainty; with `png_dir`, the panels also as `panel_<i>_<case_id>.png` files there.

    Args:
      writer: a `logging_utils.MetricWriter`.
      step: training step.
      name: the evaluator's name; tags are `eval/<name>/panel_<i>` and
        `eval/<name>/uncertainty_hist`.
      panels: (case_id, RGB array) in display order, e.g. from `draw_panel`.
      uncertainty: every pixel's uncertainty of the evaluator (any shape).
      png_dir: also save the panels as PNG files in this folder.
    """
    for i, (case_id, panel) in enumerate(panels):
        if png_dir is not None:
            save_png(panel, os.path.join(png_dir, f"panel_{i}_{case_id}.png"))
        writer.image(step, f"eval/{name}/panel_{i}", panel)
    writer.histogram(step, f"eval/{name}/uncertainty_hist", uncertainty)


def draw_box(
    rgb: np.ndarray, top: int, left: int, side: int, colour=(0, 255, 255), width: int = 2
) -> np.ndarray:
    """A copy of an RGB uint8 image with a square's outline drawn (clipped to the image), e.g.
    the region located in a photograph."""
    out = np.array(rgb, np.uint8, copy=True)
    h, w = out.shape[:2]
    r0, c0, r1, c1 = top, left, top + side - 1, left + side - 1
    for k in range(width):
        rows = slice(max(r0 + k, 0), min(r1 - k, h - 1) + 1)
        cols = slice(max(c0 + k, 0), min(c1 - k, w - 1) + 1)
        for r in (r0 + k, r1 - k):
            if 0 <= r < h:
                out[r, cols] = colour
        for c in (c0 + k, c1 - k):
            if 0 <= c < w:
                out[rows, c] = colour
    return out


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 8) -> np.ndarray:
    """Two RGB uint8 images next to each other on white, tops aligned."""
    h = max(left.shape[0], right.shape[0])
    out = np.full((h, left.shape[1] + gap + right.shape[1], 3), 255, np.uint8)
    out[: left.shape[0], : left.shape[1]] = left[..., :3]
    out[: right.shape[0], left.shape[1] + gap :] = right[..., :3]
    return out
