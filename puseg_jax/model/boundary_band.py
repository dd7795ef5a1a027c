"""The ground-truth boundary band and the oracle's weights placed on it.

The oracle (`loss.uncertainty_source='boundary_oracle'`, a diagnostic, never a default) asks
whether weighting hard pixels can help at all: it puts the mean weight the uncertainty map would
have given on the pixels near a true boundary instead (docs/method.md, "The oracle, the onset and
the diagnostics"). The band also scores where the uncertainty lies (`train.diagnostics`).
"""

import jax
import jax.numpy as jnp


def structure_maps(mask: jax.Array, label_mode: str, num_outputs: int) -> jax.Array:
    """The binary map of every structure whose boundary counts, [B, H, W, S] float32.

    Args:
      mask: class indices [B, H, W] int.
      label_mode: 'softmax' (structures = the foreground classes 1..K-1, each `mask == c`) or
        'sigmoid' (structures = the nested channels, channel k = `mask > k`).
      num_outputs: K, channels of the logit head.

    Returns:
      [B, H, W, S] with S = K - 1 (softmax) or K (sigmoid).
    """
    if label_mode == "softmax":
        classes = jnp.arange(1, num_outputs)
        return (mask[..., None] == classes).astype(jnp.float32)
    if label_mode == "sigmoid":
        return (mask[..., None] > jnp.arange(num_outputs)).astype(jnp.float32)
    raise ValueError(f"Unknown label_mode {label_mode!r}")


def boundary_band(mask: jax.Array, label_mode: str, num_outputs: int, k: int) -> jax.Array:
    """1 on the pixels within `k` px of a ground-truth boundary of any structure, 0 elsewhere.

    Pixel i is in the band when its (2k+1) x (2k+1) window (Chebyshev distance <= k, cut at the
    image edge) holds both a pixel inside and a pixel outside some structure: the dilation minus
    the erosion of the structure's map (max and min pooling), united over the structures. Across
    a straight edge the band is 2k pixels wide, k on each side; the image edge is no boundary.
    Computed per image, so every device layout gives the same band.

    Args:
      mask: class indices [B, H, W] int (the training mask, at the network input's size).
      label_mode: 'softmax' or 'sigmoid' (see `structure_maps`).
      num_outputs: K.
      k: half-width in pixels, >= 1.

    Returns:
      [B, H, W] float32 in {0, 1}.
    """
    maps = structure_maps(mask, label_mode, num_outputs)
    window = (1, 2 * k + 1, 2 * k + 1, 1)
    strides = (1, 1, 1, 1)
    # reduce_window pads with the init value, so the padding never wins the max or the min.
    dilated = jax.lax.reduce_window(maps, -jnp.inf, jax.lax.max, window, strides, "SAME")
    eroded = jax.lax.reduce_window(maps, jnp.inf, jax.lax.min, window, strides, "SAME")
    return jnp.max(dilated - eroded, axis=-1)


def oracle_uncertainty(band: jax.Array, u: jax.Array, axis_name: str | None = None) -> jax.Array:
    """U_oracle = band * mean(U) / mean(band), global-batch means, without gradient.

    With w = 1 + lambda U_oracle the mean weight is that of w = 1 + lambda U at the same step,
    all on the band. A batch without any boundary (mean(band) = 0) gets U_oracle = 0 (w = 1).

    Args:
      band: [B, H, W] from `boundary_band`.
      u: [B, H, W] the uncertainty map whose mean is matched (the sample entropy).
      axis_name: data-parallel axis to sum over, or None on one device.

    Returns:
      [B, H, W] float32, constant on the band and 0 off it (not bounded by 1).
    """

    def gmean(x):
        s, n = jnp.sum(x), jnp.asarray(x.size, jnp.float32)
        if axis_name:
            s, n = jax.lax.psum(s, axis_name), jax.lax.psum(n, axis_name)
        return s / n

    mean_u, mean_band = gmean(u), gmean(band)
    has_band = mean_band > 0
    scale = jnp.where(has_band, mean_u / jnp.where(has_band, mean_band, 1.0), 0.0)
    return jax.lax.stop_gradient(band * scale)
