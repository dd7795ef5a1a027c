"""The records of an evaluation and their files: `Predictions` (predictions.npz), the per-case
table (per_case.csv) and the JSON summaries (summary.json).

Each file format has one writer and one reader here; `runs.run_folder.RunFolder` finds the files
of a run and calls them, so nothing else opens these files by name.
"""

import csv
import dataclasses
import json
import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from puseg_jax.core.formatting import to_float

SUMMARY_FILE = "summary.json"
PER_CASE_FILE = "per_case.csv"
PREDICTIONS_FILE = "predictions.npz"

# Fields stored as float16 (a third of the file): masks recomputed from the stored
# probabilities can differ from the scored ones on pixels within float16 rounding of the
# threshold; the Dice shown everywhere is the scored one (per_case.csv).
_FLOAT16 = ("image", "probability", "uncertainty")
# Kept in memory only: one native-grid mask per example, of differing sizes.
_MEMORY_ONLY = ("native_label", "num_slices", "index")
# Names an older reader of predictions.npz may find under another name in memory (none on disk:
# the file's names have not changed; older code called the arrays 'probs' and 'mask').
_OLD_NAMES = {"probs": "probability", "mask": "label", "native_mask": "native_label"}


@dataclasses.dataclass(frozen=True, eq=False)
class Predictions:
    """Every example of one evaluator's split, in the source's order, no padding.

    The same names in memory and in predictions.npz. N is the number of examples (images, or
    slices of volumes), [H, W] the network's grid, K the output channels. Fields a producer
    does not have are None (e.g. `label` of a domain without labels).

    Attributes:
      image: [N, H, W, C] the network's input.
      label: [N, H, W] class indices (uint8 on disk) on the network's grid.
      probability: [N, H, W, K] the network's probabilities (softmax or per-channel sigmoid).
      uncertainty: [N, H, W] the uncertainty map in [0, 1].
      case_id: [N] str, the case (image or volume) of each example.
      slice_index: [N] int, its slice within the case (0 for images).
      spacing: [N, 3] (row, col, slice) pixel size on the network's grid.
      spacing_unit: [N] str, 'mm' or 'pixel'.
      native_shape: [N, 2] each example's native grid (H, W).
      native_spacing: [N, 3] (row, col, slice) pixel size on the native grid.
      resolution: the grid the evaluator was scored on, 'native' or 'network' (on disk only
        after scoring; None in a fresh prediction).
      native_label: [N] object array of uint8 class masks on each example's native grid
        (memory only; `eval.resolution='native'`).
      num_slices: [N] slices of each example's case (memory only).
      index: [N] each example's index in the source (memory only).
    """

    image: np.ndarray | None = None
    label: np.ndarray | None = None
    probability: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    case_id: np.ndarray | None = None
    slice_index: np.ndarray | None = None
    spacing: np.ndarray | None = None
    spacing_unit: np.ndarray | None = None
    native_shape: np.ndarray | None = None
    native_spacing: np.ndarray | None = None
    resolution: str | None = None
    native_label: np.ndarray | None = None
    num_slices: np.ndarray | None = None
    index: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.case_id)

    def replace(self, **changes: Any) -> "Predictions":
        """A copy with some fields replaced."""
        return dataclasses.replace(self, **changes)

    def save(self, path: str, with_label: bool = True) -> None:
        """Writes predictions.npz (zlib level 1: as small within a few percent as the default
        level, and about twice as fast; compression is most of the time of an evaluator's
        reports). Images, probabilities and uncertainty are stored as float16.

        Args:
          path: the file.
          with_label: store `label` (False for a domain without labels, whose label is a
            placeholder).
        """
        arrays = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None or field.name in _MEMORY_ONLY:
                continue
            if field.name == "label":
                if not with_label:
                    continue
                value = np.asarray(value).astype(np.uint8)
            elif field.name in _FLOAT16:
                value = np.asarray(value).astype(np.float16)
            elif field.name in ("case_id", "spacing_unit"):
                value = np.asarray(value).astype(str)
            arrays[field.name] = np.asarray(value)
        _save_npz(path, arrays)

    @classmethod
    def load(cls, path: str) -> "Predictions":
        """Reads predictions.npz (of any version: fields a file predates are None); float16
        arrays come back as float32."""
        names = {f.name for f in dataclasses.fields(cls)}
        out: dict[str, Any] = {}
        with np.load(path) as z:
            for key in z.files:
                name = _OLD_NAMES.get(key, key)
                if name not in names:
                    continue
                value = z[key]
                if name in _FLOAT16:
                    value = value.astype(np.float32)
                elif name == "resolution":
                    value = str(value)
                out[name] = value
        return cls(**out)


def _save_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """`np.savez_compressed` at zlib level 1."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)


# ---------------------------------------------------------------------------------------------
# JSON summaries.


def json_ready(x: Any) -> Any:
    """A nested structure with NaN and infinities as None (strict JSON) and numpy scalars as
    Python numbers."""
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(path: str, obj: Any) -> None:
    """A summary as strict JSON (undefined values as null)."""
    with open(path, "w") as f:
        json.dump(json_ready(obj), f, indent=2, allow_nan=False)


def read_json(path: str) -> dict[str, Any]:
    """A summary (undefined values come back as None)."""
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# per_case.csv.

# Per-slice counts of `metrics.compute_slicewise_metrics`, summed over cases in summaries.
SLICE_COUNTS = ("slices_scored", "slices_empty_pred", "slices_empty_gt")

PER_CASE_COLUMNS = (
    "case_id",
    "structure",
    "dice",
    "hd95",
    "asd",
    "empty_pred",
    "empty_gt",
    "num_slices",
    "unit",
    "distance",
) + SLICE_COUNTS

# {case_id: {structure: {'dice', 'hd95', 'asd', 'empty_pred', 'empty_gt'}}}
PerCase = dict[str, dict[str, dict[str, Any]]]


def write_per_case(
    path: str, rows: Sequence[Mapping], structures: Sequence[str], unit: str, distance: str = ""
) -> None:
    """per_case.csv: one line per case and structure (distances in `unit`, measured as
    `distance` says; the slice counts are blank unless distances are per slice).

    Args:
      path: the file.
      rows: `scoring.score_cases` rows.
      structures: the family's structures, in order.
      unit: the distance unit.
      distance: how distances were measured (`scoring.describe_distances`).
    """
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PER_CASE_COLUMNS)
        for row in rows:
            for s in structures:
                r = row[s]
                w.writerow(
                    [
                        row["case_id"],
                        s,
                        r["dice"],
                        r["hd95"],
                        r["asd"],
                        r["empty_pred"],
                        r["empty_gt"],
                        row["num_slices"],
                        unit,
                        distance,
                    ]
                    + [r.get(key, "") for key in SLICE_COUNTS]
                )


def read_per_case(path: str) -> PerCase:
    """per_case.csv as {case_id: {structure: {dice, hd95, asd, empty_pred, empty_gt}}}, cases
    and structures in the file's order; undefined distances (written empty or 'nan') are NaN."""
    out: PerCase = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["case_id"], {})[row["structure"]] = {
                "dice": to_float(row["dice"]),
                "hd95": to_float(row["hd95"]),
                "asd": to_float(row["asd"]),
                "empty_pred": row["empty_pred"] == "True",
                "empty_gt": row["empty_gt"] == "True",
            }
    return out


def case_dice(per_case: PerCase) -> dict[str, dict[str, float]]:
    """{case_id: {structure: Dice}} of a per-case table."""
    return {c: {s: m["dice"] for s, m in row.items()} for c, row in per_case.items()}


def has_reports(folder: str) -> bool:
    """Whether an evaluator's folder holds all three report files."""
    return all(
        os.path.isfile(os.path.join(folder, f))
        for f in (SUMMARY_FILE, PER_CASE_FILE, PREDICTIONS_FILE)
    )
