"""Host-side segmentation and uncertainty metrics (NumPy/SciPy).

Everything here runs on the host on unpadded NumPy arrays (JAX arrays are accepted and converted):
per-case overlap and surface metrics, post-processing, summaries over cases, and the quality of
pixel-wise uncertainty. Nothing here knows about devices.

Surface metrics follow ``medpy.metric.binary`` exactly (``hd95`` and ``assd``, surfaces from a
connectivity-1 erosion) and agree with it to floating-point precision, but compute the two
distance transforms once, on a bounding box around both masks, instead of four times on the full
array.

Empty-mask convention (per structure and case, never NaN):

* both prediction and ground truth empty: Dice 1, HD95 0, ASD 0;
* exactly one of them empty: Dice 0, HD95 = ASD = the diagonal of the image or volume in the
  unit of ``spacing``, ``sqrt(sum((shape * spacing) ** 2))``, longer than any distance between
  two voxels in it, so a structure that is missed or hallucinated scores worse than any
  prediction that finds it.

Per-case results carry ``empty_pred`` and ``empty_gt`` flags so that summaries count such cases
instead of dropping them. Stacks of slices without a slice distance
(``compute_slicewise_metrics``) apply the convention per slice, average HD95/ASD over the slices
where either mask is non-empty, and count the slices that were missed or hallucinated.
"""

from puseg_jax.metrics.boundary import boundary_band
from puseg_jax.metrics.calibration import (
    auroc,
    brier_score,
    calibration_from_sums,
    calibration_sums,
    nll,
)
from puseg_jax.metrics.overlap import compute_dice, largest_connected_component
from puseg_jax.metrics.surface import (
    compute_case_metrics,
    compute_slicewise_metrics,
    compute_surface_metrics,
    empty_mask_distance,
    summarize,
    summarize_cases,
    surface_distances,
)

__all__ = [
    "auroc",
    "boundary_band",
    "brier_score",
    "calibration_from_sums",
    "calibration_sums",
    "compute_case_metrics",
    "compute_dice",
    "compute_slicewise_metrics",
    "compute_surface_metrics",
    "empty_mask_distance",
    "largest_connected_component",
    "nll",
    "summarize",
    "summarize_cases",
    "surface_distances",
]
