"""Figure helpers on plain arrays: saving a figure, the slices of a volume worth showing."""

import numpy as np
from matplotlib.figure import Figure

TILE_INCHES = 1.9  # side of one image tile in figures

# ---------------------------------------------------------------------------------------------
# Figures.


def save_figure(fig: Figure, path: str, dpi: int = 100) -> str:
    """Saves a figure as PNG (`.png` added when missing) and returns the path."""
    if not path.endswith(".png"):
        path += ".png"
    fig.savefig(path, dpi=dpi)
    return path


def volume_slices(arrays: dict[str, np.ndarray], max_slices: int = 12) -> list[int]:
    """Slices worth showing: those with ground truth or prediction, at most `max_slices`
    evenly spread (all slices when the volume has no foreground at all)."""
    fg = (arrays["gt"] | arrays["pred"]).any(axis=(0, 2, 3))
    slices = np.flatnonzero(fg) if fg.any() else np.arange(fg.size)
    if len(slices) > max_slices:
        slices = slices[np.round(np.linspace(0, len(slices) - 1, max_slices)).astype(int)]
    return [int(s) for s in slices]
