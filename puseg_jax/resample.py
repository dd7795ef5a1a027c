"""Resampling between the network's grid and a case's native (released) grid, on the host.

Bilinear interpolation with half-pixel centres (the convention of `jax.image.resize`,
PyTorch's `interpolate(..., align_corners=False)` and PIL): output pixel i of n_out samples the
input at x = (i + 0.5) * n_in / n_out - 0.5, clamped to [0, n_in - 1] at the borders. It is
separable, so an image is resampled as two small matrix products, exact and fast enough for
whole evaluation splits (a 128x128x2 map to 512x512 takes well under a millisecond of matmul).

Used to bring class probabilities and uncertainty maps from the network's input size back to the
grid of the unresized ground truth before thresholding and scoring (`eval.resolution='native'`),
and to write predictions in the user's own image size.
"""

from collections.abc import Sequence

import numpy as np


def linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """Interpolation matrix [n_out, n_in]: row i holds the weights of output sample i.

    Args:
      n_in: input samples along the axis.
      n_out: output samples.

    Returns:
      float64 matrix whose rows sum to 1 (at most two non-zero weights per row).
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"Cannot resample {n_in} samples to {n_out}")
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    x = np.clip(x, 0.0, n_in - 1)
    lo = np.floor(x).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = x - lo
    w = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    np.add.at(w, (rows, lo), 1.0 - frac)
    np.add.at(w, (rows, hi), frac)
    return w


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
    rows = linear_weights(h, out_h).astype(np.float32)
    cols = linear_weights(w, out_w).astype(np.float32)
    c = int(np.prod(x.shape[2:], dtype=np.int64))
    out = (rows @ x.reshape(h, w * c)).reshape(out_h, w, c)  # rows first: [H, w, c]
    out = np.matmul(out.transpose(0, 2, 1), cols.T)  # then columns: [H, c, W]
    return np.ascontiguousarray(out.transpose(0, 2, 1)).reshape((out_h, out_w) + x.shape[2:])
