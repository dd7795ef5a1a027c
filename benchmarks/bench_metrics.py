"""Speed of puseg_jax.metrics HD95 + ASD against medpy's hd95 + assd, in the same run.

Cases: a synthetic prostate-like blob in an anisotropic 384x384x24 volume (0.6 x 0.6 x 3.6 mm),
a synthetic disc-like blob in a 256x256 image, and, when ../shared/data is beside the checkout,
a real 512x512 fundus disc mask and the PROMISE12 NIfTI label. The "prediction" is a perturbed
copy of the ground truth. Each timing is the best of --repeats rounds in which ours and medpy
take turns (the machine is shared).

    python -m benchmarks.bench_metrics [--repeats 5] [--seed 0]   # from the repository root
"""

import argparse
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from puseg_jax import metrics

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _smooth_blob(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    centre: tuple[float, ...],
    radii: tuple[float, ...],
    roughness: float,
) -> np.ndarray:
    """An ellipsoid with a low-frequency wobble of its boundary, like an organ outline."""
    grid = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    radius = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=6)
    noise *= roughness / (noise.std() + 1e-8)
    return radius + noise < 1.0


def _perturbed(rng: np.random.Generator, gt: np.ndarray) -> np.ndarray:
    """Prediction = ground truth shifted by a few voxels and grown in-plane, plus a false
    positive speck, so that both directed distance sets are non-trivial."""
    offset = [3, -2] + [1] * (gt.ndim - 2)
    pred = ndimage.shift(gt.astype(np.uint8), offset, order=0) > 0
    footprint = np.ones((3, 3) + (1,) * (gt.ndim - 2), dtype=bool)
    pred = ndimage.binary_dilation(pred, structure=footprint, iterations=2)
    speck = tuple(int(rng.integers(n // 8, n - n // 8)) for n in gt.shape)
    pred[speck] = True
    return pred


def _cases(rng: np.random.Generator) -> list[tuple[str, np.ndarray, np.ndarray, tuple]]:
    cases = []
    # A prostate is ~45 mm across: ~37 px radius at 0.6 mm in-plane, ~6 slices at 3.6 mm.
    shape = (384, 384, 24)
    gt = _smooth_blob(rng, shape, (200, 180, 12), (37, 32, 6), roughness=0.08)
    cases.append(("synthetic 3-D 384x384x24, (0.6,0.6,3.6) mm", gt, _perturbed(rng, gt),
                  (0.6, 0.6, 3.6)))  # fmt: skip
    gt = _smooth_blob(rng, (256, 256), (128, 120), (45, 40), roughness=0.05)
    cases.append(("synthetic 2-D 256x256, pixels", gt, _perturbed(rng, gt), (1.0, 1.0)))
    fundus = sorted(DATA_DIR.glob("fundus/Domain*/*/ROIs/mask/*.png"))
    if fundus:
        from PIL import Image

        mask = np.asarray(Image.open(fundus[0]).convert("L"))
        gt = mask < 255
        cases.append((f"real fundus OD 512x512 ({fundus[0].stem})", gt, _perturbed(rng, gt),
                      (1.0, 1.0)))  # fmt: skip
    nifti = DATA_DIR / "prostate_nifti" / "promise12_case00" / "Case00_segmentation.nii.gz"
    if nifti.is_file():
        import nibabel

        image = nibabel.load(nifti)
        gt = np.asarray(image.dataobj) > 0
        spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
        cases.append(("real PROMISE12 128x128x64, header mm", gt, _perturbed(rng, gt), spacing))
    return cases


def _best_times(fns, repeats: int) -> tuple[list[float], list[object]]:
    """Best wall time of each function over `repeats` rounds, the functions taking turns within a
    round so that load from other processes on the machine hits both alike."""
    best, results = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            results[i] = fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timings per case; best is kept")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic shapes")
    args = parser.parse_args()

    from medpy.metric import binary as medpy_binary

    rng = np.random.default_rng(args.seed)
    print("| case | ours ms | medpy ms | speed-up | max abs diff |")
    print("|---|---:|---:|---:|---:|")
    for name, gt, pred, spacing in _cases(rng):

        def ours(pred=pred, gt=gt, spacing=spacing):
            return metrics.compute_surface_metrics(pred, gt, spacing)

        def reference(pred=pred, gt=gt, spacing=spacing):
            return (
                medpy_binary.hd95(pred, gt, voxelspacing=spacing),
                medpy_binary.assd(pred, gt, voxelspacing=spacing),
            )

        (ours_s, reference_s), (ours_values, reference_values) = _best_times(
            [ours, reference], args.repeats
        )
        difference = max(abs(a - b) for a, b in zip(ours_values, reference_values, strict=True))
        print(
            f"| {name} | {ours_s * 1e3:.1f} | {reference_s * 1e3:.1f} | "
            f"{reference_s / ours_s:.1f}x | {difference:.1e} |"
        )


if __name__ == "__main__":
    main()
