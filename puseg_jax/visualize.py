"""PNG panels of predictions: image, ground truth, prediction, uncertainty, errors.

Panels are built from the arrays evaluation saves (`eval/<name>/predictions.npz`), so the
command line, TensorBoard and the notebook show the same pictures.
"""

import numpy as np
from matplotlib import colormaps
from PIL import Image

# Colours of structures 1..S in label overlays, and of false positives / false negatives.
STRUCTURE_COLOURS = np.array([[0.1, 0.8, 0.2], [1.0, 0.85, 0.1], [0.2, 0.5, 1.0]])
FP_COLOUR = np.array([1.0, 0.2, 0.2])
FN_COLOUR = np.array([0.2, 0.6, 1.0])


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


def heatmap(u: np.ndarray, cmap: str = "magma") -> np.ndarray:
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


def make_panel(image, gt_structs, pred_structs, uncertainty, gap: int = 2) -> np.ndarray:
    """[H, 5W] RGB: image | ground truth | prediction | uncertainty | errors."""
    rgb = to_rgb(image)
    tiles = [
        rgb,
        overlay(rgb, gt_structs),
        overlay(rgb, pred_structs),
        heatmap(uncertainty),
        error_map(rgb, pred_structs, gt_structs),
    ]
    h = rgb.shape[0]
    sep = np.ones((h, gap, 3), np.float32)
    parts = []
    for t in tiles:
        parts += [t.astype(np.float32), sep]
    return np.concatenate(parts[:-1], axis=1)


def save_png(panel: np.ndarray, path: str, scale: int = 2) -> None:
    img = Image.fromarray((np.clip(panel, 0, 1) * 255).astype(np.uint8))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def panels_for_domain(pred, rows, info, config, num: int) -> list[tuple[str, np.ndarray]]:
    """Panels for the first `num` cases (fixed, so runs and steps are comparable); for volumes
    the slice with the largest ground-truth area."""
    from puseg_jax import evaluation

    out = []
    for case_id, idx in evaluation.group_cases(pred, info.volumetric)[:num]:
        gt_all = evaluation.gt_structures(pred["mask"][idx], info)  # [S, D, H, W]
        j = int(np.argmax(gt_all.reshape(gt_all.shape[0], len(idx), -1).sum(axis=(0, 2))))
        i = idx[j]
        pm = evaluation.structure_masks(pred["probs"][i], info, config)
        gt = gt_all[:, j]
        out.append((case_id, make_panel(pred["image"][i], gt, pm, pred["uncertainty"][i])))
    return out
