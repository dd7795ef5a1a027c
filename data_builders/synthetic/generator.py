"""Synthetic multi-domain fundus and prostate images, in pure NumPy.

Two small image models with per-domain acquisition parameters, used to exercise the whole
domain-generalisation pipeline without the real (licence-restricted) data:

* `generate_fundus`: an RGB optic-disc ROI with an elliptical disc, a brighter cup inside it and
  dark vessels crossing it; mask 0 background, 1 disc rim, 2 cup.
* `generate_prostate_volume`: a single-channel T2-like volume with a smooth gland whose
  cross-section shrinks to nothing at both ends of the volume; mask 0 background, 1 gland.

Domains differ the way cameras and scanners differ (colour cast, brightness, contrast, blur,
noise, vignetting or bias field, resolution); the anatomy is drawn from the same distribution in
every domain. The cup/rim boundary is a gradual intensity ramp everywhere and the disc and gland
edges are soft in some domains, so the label boundary is genuinely ambiguous there.

Everything is a function of a `numpy.random.Generator` (or a seed), so a TFDS builder seeding it
with `(seed, domain, split, index)` is deterministic.
"""

from __future__ import annotations

import dataclasses

import numpy as np

FUNDUS_CLASSES = ("background", "disc_rim", "cup")
PROSTATE_CLASSES = ("background", "gland")


@dataclasses.dataclass(frozen=True)
class FundusDomain:
    """Acquisition parameters of one fundus camera; lengths are fractions of the image side.

    Intensities are on a [0, 1] scale. The camera model runs in this order: exposure and colour
    gains, contrast and brightness, uneven illumination (vignetting and a gradient), blur,
    sensor noise, then the tone curve (highlight shoulder) and 8-bit clipping.
    """

    colour_cast: tuple[float, float, float]  # RGB gains (white balance, spectral response)
    brightness: float  # added to [0, 1] intensities
    contrast: float  # gain about mid-grey
    blur: float  # Gaussian blur sigma, fraction of the image side
    noise: float  # std of additive Gaussian noise, [0, 1] intensities
    vignetting: float  # darkening at the corners, 0 = none
    disc_scale: float  # mean disc semi-axis, fraction of the image side (magnification)
    disc_edge: float  # width of the disc edge ramp (~10-90 %), fraction of the disc radius
    illumination: float = 0.0  # linear illumination gradient: gain 1 +- this at the image edges
    exposure: float = 0.0  # std of the log of a per-image exposure gain (flash, pupil size)
    knee: float = 1.0  # tone curve: linear up to here, then compressed towards 1 (1 = linear)
    vessel_contrast: float = 0.55  # how much the vessels darken the tissue at their centre


# One row per camera; docs/synthetic.md tabulates the same values and what they look like.
# fmt: off
FUNDUS_DOMAINS = {
    # Drishti-GS-like: a narrow field around the disc (large disc, wide dark vessels), sharp,
    # warm and over-exposed (the disc rolls off into the tone-curve shoulder), with strongly
    # uneven illumination and exposure that varies from image to image.
    "Domain1": FundusDomain(
        colour_cast=(1.05, 0.95, 0.85), brightness=0.05, contrast=1.00, blur=0.000,
        noise=0.020, vignetting=0.30, disc_scale=0.30, disc_edge=0.08,
        illumination=0.35, exposure=0.25, knee=0.6, vessel_contrast=0.75,
    ),
    # RIM-ONE-like: dark, green cast, low contrast, mild blur, noisy, soft disc edge.
    "Domain2": FundusDomain(
        colour_cast=(0.80, 1.15, 0.95), brightness=-0.12, contrast=0.65, blur=0.008,
        noise=0.040, vignetting=0.35, disc_scale=0.22, disc_edge=0.24,
        illumination=0.10, exposure=0.10, knee=1.0, vessel_contrast=0.50,
    ),
    # Bright, saturated yellow, high contrast, strong vignetting, small disc.
    "Domain3": FundusDomain(
        colour_cast=(1.10, 1.00, 0.55), brightness=0.12, contrast=1.30, blur=0.000,
        noise=0.020, vignetting=0.60, disc_scale=0.16, disc_edge=0.10,
        illumination=0.15, exposure=0.10, knee=0.85, vessel_contrast=0.55,
    ),
    # Blue-grey cast, heavy blur, little noise, large soft disc: the most ambiguous domain.
    "Domain4": FundusDomain(
        colour_cast=(0.85, 0.95, 1.40), brightness=0.04, contrast=0.85, blur=0.020,
        noise=0.010, vignetting=0.10, disc_scale=0.27, disc_edge=0.36,
        illumination=0.05, exposure=0.05, knee=1.0, vessel_contrast=0.45,
    ),
}
# fmt: on


@dataclasses.dataclass(frozen=True)
class ProstateSite:
    """Acquisition parameters of one MRI site."""

    fov_mm: float  # in-plane field of view of the stored ROI; spacing = fov_mm / size
    slice_thickness_mm: float  # slice spacing
    intensity: float  # mean tissue intensity, [0, 1]
    gland_contrast: float  # gland minus surrounding tissue, [0, 1] intensities
    edge_mm: float  # width of the gland edge ramp (~10-90 %), mm
    bias: float  # std of the log of the smooth multiplicative bias field (coil shading)
    noise: float  # std of Rician-like noise, [0, 1] intensities


PROSTATE_SITES = {
    "SiteA": ProstateSite(76.8, 3.6, 0.45, 0.12, 1.0, 0.10, 0.020),  # RUNMC-like, 3T body coil
    "SiteB": ProstateSite(64.0, 4.0, 0.30, 0.10, 1.5, 0.45, 0.040),  # BMC-like, endorectal coil
    "SiteC": ProstateSite(70.0, 1.25, 0.55, 0.08, 2.5, 0.15, 0.030),  # I2CVB-like, thin slices
    "SiteD": ProstateSite(96.0, 3.6, 0.38, 0.14, 1.0, 0.20, 0.025),  # UCL-like, wide FOV
    "SiteE": ProstateSite(80.0, 3.0, 0.25, 0.06, 3.0, 0.50, 0.050),  # BIDMC-like, low contrast
    "SiteF": ProstateSite(80.0, 3.6, 0.62, 0.12, 1.5, 0.10, 0.060),  # HK-like, bright and noisy
}


def _rng(rng_or_seed: np.random.Generator | int | tuple[int, ...]) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cutoff: float) -> np.ndarray:
    """Zero-mean, unit-std, low-frequency noise; `cutoff` is in cycles per image side."""
    h, w = shape
    spectrum = rng.standard_normal((h, w // 2 + 1)) + 1j * rng.standard_normal((h, w // 2 + 1))
    fy = np.fft.fftfreq(h)[:, None] * h
    fx = np.fft.rfftfreq(w)[None, :] * w
    field = np.fft.irfft2(spectrum * np.exp(-(fy**2 + fx**2) / cutoff**2), s=(h, w))
    return (field - field.mean()) / (field.std() + 1e-8)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of the first two axes, reflecting at the borders."""
    if sigma < 0.3:
        return image
    radius = int(np.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * image.ndim
        pad[axis] = (radius, radius)
        windows = np.lib.stride_tricks.sliding_window_view(
            np.pad(image, pad, mode="reflect"), 2 * radius + 1, axis=axis
        )
        image = windows @ kernel
    return image


def _ellipse_radius(yy, xx, centre, semi_axes, angle):
    """Normalised elliptical radius: 1 on the ellipse, 0 at its centre."""
    dy, dx = yy - centre[0], xx - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    return np.sqrt((v / semi_axes[0]) ** 2 + (u / semi_axes[1]) ** 2)


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
    """Smooth step from 1 (x << 0) to 0 (x >> 0) over about `width`."""
    return 1.0 / (1.0 + np.exp(np.clip(4.0 * x / max(width, 1e-3), -30, 30)))


def _tone_curve(x: np.ndarray, knee: float) -> np.ndarray:
    """Camera response with a highlight shoulder: linear up to `knee`, then rolling off smoothly
    (slope 1 at the knee) towards 1, so over-exposed bright values (disc rim and cup) are
    compressed together instead of clipped; a knee of 1 or more is the identity."""
    if knee >= 1.0:
        return x
    over = np.maximum(x - knee, 0.0)
    return np.minimum(x, knee) + (1.0 - knee) * np.tanh(over / (1.0 - knee))


def _vessel_map(
    rng, shape: tuple[int, int], centre, size: float, magnification: float
) -> np.ndarray:
    """Darkening in [0, 1] from a few smooth vessels leaving the disc up and down; their width
    scales with `magnification` (the disc scale over 0.2), as the disc's does."""
    darkness = np.zeros(shape)
    t = np.linspace(0.0, 1.0, 4 * int(size))[:, None]  # several samples per pixel of length
    for direction in (-1.0, -1.0, 1.0, 1.0, rng.choice([-1.0, 1.0])):
        start = np.array(centre) + rng.normal(0, 0.02 * size, 2)
        # Quadratic Bezier arcs: out of the disc vertically, bending nasally or temporally.
        bend = np.array([direction * 0.35, rng.uniform(-0.35, 0.35)]) * size
        end = start + np.array([direction * rng.uniform(0.5, 0.7), rng.uniform(-0.6, 0.6)]) * size
        points = (1 - t) ** 2 * start + 2 * (1 - t) * t * (start + bend) + t**2 * end - 0.5
        # Splat the centreline bilinearly with unit mass per pixel of length, then blur it into
        # a Gaussian profile whose peak is ~1 (cheaper than a distance map at every pixel).
        step = np.linalg.norm(np.diff(points, axis=0), axis=1).mean()
        weight = step * (1.0 - 0.5 * t[:, 0])  # vessels fade as they thin out
        base = np.floor(points).astype(int)
        frac = points - base
        line = np.zeros((shape[0] + 1, shape[1] + 1))
        for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
            w = np.abs(1 - dy - frac[:, 0]) * np.abs(1 - dx - frac[:, 1]) * weight
            iy, ix = base[:, 0] + dy, base[:, 1] + dx
            inside = (iy >= 0) & (iy < shape[0]) & (ix >= 0) & (ix < shape[1])
            np.add.at(line, (iy[inside], ix[inside]), w[inside])
        sigma = max(rng.uniform(0.007, 0.013) * size * magnification, 0.5)
        profile = _gaussian_blur(line[: shape[0], : shape[1]], sigma) * np.sqrt(2 * np.pi) * sigma
        darkness = np.maximum(darkness, np.clip(profile, 0.0, 1.0))
    return darkness


def generate_fundus(
    rng_or_seed: np.random.Generator | int | tuple[int, ...], domain: str, size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Draws one fundus-like optic-disc ROI of `domain`.

    Args:
      rng_or_seed: a NumPy Generator, or a seed (int or tuple of ints) for one.
      domain: a key of `FUNDUS_DOMAINS`.
      size: side of the square image in pixels.

    Returns:
      `(image, mask)`: uint8 `(size, size, 3)` RGB image and uint8 `(size, size)` mask with
      0 background, 1 disc rim, 2 cup. Every cup pixel lies strictly inside the disc.
    """
    p, rng = FUNDUS_DOMAINS[domain], _rng(rng_or_seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    # Anatomy, identical in distribution across domains apart from the disc scale.
    centre = size * (0.5 + rng.uniform(-0.06, 0.06, 2))
    radius = p.disc_scale * size * rng.uniform(0.9, 1.1)
    disc_axes = (radius * rng.uniform(1.0, 1.15), radius)  # discs are slightly taller than wide
    angle = rng.uniform(-0.3, 0.3)
    cup_to_disc = rng.uniform(0.3, 0.7)
    cup_centre = centre + rng.uniform(-0.08, 0.08, 2) * radius
    cup_axes = (disc_axes[0] * cup_to_disc, disc_axes[1] * cup_to_disc * rng.uniform(0.9, 1.1))
    r_disc = _ellipse_radius(yy, xx, centre, disc_axes, angle)
    r_cup = _ellipse_radius(yy, xx, cup_centre, cup_axes, angle)
    disc = r_disc <= 1.0
    # Cup only where the whole 3x3 neighbourhood is disc, so cup never touches background.
    padded = np.pad(disc, 1)
    disc_interior = np.all(
        [padded[i : i + size, j : j + size] for i in range(3) for j in range(3)], 0
    )
    mask = disc.astype(np.uint8) + ((r_cup <= 1.0) & disc_interior).astype(np.uint8)

    # Appearance: retina texture, disc with a domain-dependent edge, cup with a wide soft ramp.
    texture = _smooth_noise(rng, (size, size), cutoff=4.0)
    retina = np.array([0.72, 0.30, 0.12]) * (1.0 + 0.12 * texture[..., None])
    disc_alpha = _ramp(r_disc - 1.0, p.disc_edge)[..., None]
    cup_alpha = _ramp(r_cup - 1.0, 0.5)[..., None]  # ramp over half the cup radius: always soft
    image = retina * (1 - disc_alpha) + np.array([0.92, 0.70, 0.42]) * disc_alpha
    image = image * (1 - cup_alpha) + np.array([1.0, 0.92, 0.72]) * cup_alpha
    vessels = p.vessel_contrast * _vessel_map(
        rng, (size, size), cup_centre, size, p.disc_scale / 0.2
    )
    image = image * (1 - vessels[..., None]) + np.array([0.35, 0.05, 0.03]) * vessels[..., None]

    # Camera: exposure and colour gains, contrast and brightness, uneven illumination (vignetting
    # and a linear gradient in a random direction), blur, noise, tone curve.
    exposure = rng.uniform(0.95, 1.05) * np.exp(p.exposure * rng.standard_normal())
    image = image * np.array(p.colour_cast) * exposure
    image = (image - 0.5) * p.contrast + 0.5 + p.brightness
    corner = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (size**2 / 2)
    direction = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(direction), np.sin(direction)
    across = (c * (xx - size / 2) + s * (yy - size / 2)) / (size / 2)  # +-1 at the edges
    image = image * ((1.0 - p.vignetting * corner) * (1.0 + p.illumination * across))[..., None]
    image = _gaussian_blur(image, p.blur * size)
    image = image + rng.normal(0.0, p.noise, image.shape)
    image = _tone_curve(image, p.knee)
    image = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    return image, mask


def generate_prostate_volume(
    rng_or_seed: np.random.Generator | int | tuple[int, ...],
    site: str,
    size: int = 128,
    num_slices: int = 12,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Draws one prostate-like T2 volume of `site`.

    The gland is an ellipsoid-like body with a smoothly deformed axial outline; its cross-section
    goes to zero before the first and the last slice, so both end slices have empty masks.

    Args:
      rng_or_seed: a NumPy Generator, or a seed (int or tuple of ints) for one.
      site: a key of `PROSTATE_SITES`.
      size: side of the square slices in pixels.
      num_slices: number of axial slices (at least 3).

    Returns:
      `(volume, mask, spacing)`: uint8 `(num_slices, size, size)` volume, uint8 mask of the same
      shape (0 background, 1 gland) and the `(row, col, slice)` spacing in mm.
    """
    if num_slices < 3:
        raise ValueError(
            f"num_slices must be at least 3 (empty ends around the gland), got {num_slices}"
        )
    p, rng = PROSTATE_SITES[site], _rng(rng_or_seed)
    spacing = (p.fov_mm / size, p.fov_mm / size, p.slice_thickness_mm)
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float64) + 0.5 - size / 2) * spacing[0]
    theta = np.arctan2(yy, xx)
    # Gland size in mm, the same distribution at every site; the pixel size is the site's.
    centre = rng.normal(0, 2.5, 2)
    semi_axes = (rng.uniform(13, 17), rng.uniform(18, 24))  # (anterior-posterior, left-right)
    harmonics = [(k, rng.uniform(0, 0.08), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)]
    half_extent = rng.uniform(0.55, 0.8) * (num_slices - 1) / 2  # in slices
    max_shift = (num_slices - 1) / 2 - half_extent
    z_centre = (num_slices - 1) / 2 + rng.uniform(-0.5, 0.5) * max_shift
    dy, dx = yy - centre[0], xx - centre[1]
    outline = 1.0 + sum(a * np.cos(k * theta + phi) for k, a, phi in harmonics)
    r_gland = np.sqrt((dy / semi_axes[0]) ** 2 + (dx / semi_axes[1]) ** 2) / outline
    r_rectum = np.hypot((yy - centre[0] - semi_axes[0] - 9) / 7, (xx - centre[1]) / 12)

    volume = np.empty((num_slices, size, size))
    mask = np.zeros((num_slices, size, size), np.uint8)
    bias = np.exp(p.bias * _smooth_noise(rng, (size, size), cutoff=1.5))
    mean_radius = np.mean(semi_axes)
    for z in range(num_slices):
        scale = np.sqrt(max(0.0, 1.0 - ((z - z_centre) / half_extent) ** 2))
        tissue = p.intensity * (1.0 + 0.08 * _smooth_noise(rng, (size, size), cutoff=12.0))
        tissue = tissue * (1 - 0.7 * _ramp(r_rectum - 1.0, 0.3))
        if scale > 0:
            # Distance outside the scaled outline, in mm, drives the gland's soft edge.
            outside_mm = (r_gland - scale) * mean_radius
            gland = _ramp(outside_mm, p.edge_mm)
            peripheral = _ramp(-(outside_mm + 4.0), 3.0)  # brighter rim, as the T2 PZ
            capsule = np.exp(-(((outside_mm - 0.5) / max(p.edge_mm, 1.0)) ** 2))  # dark line
            tissue = tissue + p.gland_contrast * (gland * (0.6 + 0.6 * peripheral) - 0.6 * capsule)
            mask[z] = r_gland <= scale
        # Complex Gaussian noise seen through the magnitude: Rician, as in MR magnitude images.
        noise = rng.normal(0.0, p.noise, (2, size, size))
        volume[z] = np.hypot(tissue * bias + noise[0], noise[1])
    volume = np.clip(np.round(volume * 255), 0, 255).astype(np.uint8)
    return volume, mask, spacing
