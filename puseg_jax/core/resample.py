"""Resampling between the network's grid and a case's native (released) grid, on the host.

Bilinear interpolation with half-pixel centres (the convention of `jax.image.resize`,
PyTorch's `interpolate(..., align_corners=False)` and PIL): output pixel i of n_out samples the
input at x = (i + 0.5) * n_in / n_out - 0.5, clamped to [0, n_in - 1] at the borders. It is
separable, and each output sample has two taps per axis, so an image is resampled as two
gathers and weighted sums per axis, exact and fast enough for whole evaluation splits.

Used to bring class probabilities and uncertainty maps from the network's input size back to the
grid of the unresized ground truth before thresholding and scoring (`eval.resolution='native'`),
and to write predictions in the user's own image size.
"""

from collections.abc import Sequence

import numpy as np


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, frac) of each output sample: it is (1 - frac) * in[lo] + frac * in[hi]."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"Cannot resample {n_in} samples to {n_out}")
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    x = np.clip(x, 0.0, n_in - 1)
    lo = np.floor(x).astype(np.int64)
    return lo, np.minimum(lo + 1, n_in - 1), x - lo


def _resample_axis(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Bilinear resampling along one axis, as two gathers and a weighted sum: each output sample
    has two taps, so this does an interpolation matrix's work without its zeros (and without a
    BLAS call, whose threads are slow to share on a loaded machine)."""
    lo, hi, frac = _taps(x.shape[axis], n_out)
    shape = [1] * x.ndim
    shape[axis] = n_out
    frac = frac.astype(np.float32).reshape(shape)
    return np.take(x, lo, axis) * (1 - frac) + np.take(x, hi, axis) * frac


def resize_bilinear(x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resamples the two leading axes of `x` to `shape` (bilinear, half-pixel centres).

    Args:
      x: [h, w, ...] array (e.g. probabilities [h, w, K] or an uncertainty map [h, w]).
      shape: (H, W), the output size of the two leading axes.

    Returns:
      float32 [H, W, ...]; `x` itself (as float32) when the size already matches.
    """
    h, w = x.shape[:2]
    out_h, out_w = int(shape[0]), int(shape[1])
    x = np.asarray(x, np.float32)
    if (h, w) == (out_h, out_w):
        return x
    return _resample_axis(_resample_axis(x, out_h, 0), out_w, 1)
