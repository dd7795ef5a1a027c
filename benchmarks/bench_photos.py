"""Whole fundus photographs with a trained fundus run, through the command line (issue 22).

For each set of ../shared/data/fundus_photos (PAPILA, REFUGE_val, REFUGE_train: 4 photographs
each, with masks) it runs `python -m puseg_jax.evaluate` twice: as a user would (framing decided
from the images: the disc located, the region predicted and pasted back) and with
`--framing=region --center_crop=none` (the plain resize of the whole photograph to the input,
scored on the photograph's grid; `--framing=region` alone scores the training's 512 centre crop
only, so its Dice ignores the disc wherever it falls outside that crop). For the REFUGE training
eyes it also runs the region path on the same eyes (their DoFE regions in fundus/Domain3, copied
into a flat folder). Per photograph it reports the located centre's distance to the true centre
(the centroid of the mask's disc) in true disc diameters, OD/OC Dice on the photograph's grid
(from review.csv), the plain-resize OD Dice, the region path's Dice, and the search time
(summary.json).

    python -m benchmarks.bench_photos --workdir /work/qruns/photos_ours_all4_seed0 [--out F.json]

The reports go to WORKDIR/eval/photos_<set>, plain_<set> and region_REFUGE_train.
"""

import argparse
import csv
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from puseg_jax import evaluate
from puseg_jax.external import photo_checks

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SETS = ("PAPILA", "REFUGE_val", "REFUGE_train")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores visible)"
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def review(workdir: str, name: str) -> dict[str, dict]:
    with open(os.path.join(workdir, "eval", name, "review.csv")) as f:
        return {r["case_id"]: r for r in csv.DictReader(f)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--photos", default=str(SHARED / "fundus_photos"))
    ap.add_argument("--regions", default=str(SHARED / "fundus" / "Domain3"))
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    w = args.workdir
    rows, walls = [], {}
    for s in SETS:
        folder = Path(args.photos) / s
        t0 = time.perf_counter()
        res = evaluate.main(["--workdir", w, "--data", str(folder), "--name", f"photos_{s}",
                             "--overwrite"])  # fmt: skip
        walls[s] = time.perf_counter() - t0
        evaluate.main(["--workdir", w, "--data", str(folder), "--name", f"plain_{s}",
                       "--framing=region", "--center_crop=none", "--overwrite"])  # fmt: skip
        photo, plain = review(w, f"photos_{s}"), review(w, f"plain_{s}")
        cases = res["photographs"]["cases"]
        for case in sorted(photo):
            mask = photo_checks.read_mask(folder / "mask" / f"{case}.png")
            rr, cc = np.nonzero(mask < 255)
            true_d = photo_checks.equivalent_diameter(rr.size)
            r = photo[case]
            err = math.dist((float(r["loc_row"]), float(r["loc_col"])), (rr.mean(), cc.mean()))
            rows.append(
                {
                    "set": s,
                    "case": case,
                    "centre_err_diam": err / true_d,
                    "od_dice": float(r["dice_OD"]),
                    "oc_dice": float(r["dice_OC"]),
                    "plain_od_dice": float(plain[case]["dice_OD"]),
                    "search_seconds": cases[case]["seconds"],
                    "flags": r["loc_flags"],
                }
            )
    # The region path on the REFUGE training eyes: their DoFE regions, as released.
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "REFUGE_train_regions"
        for sub in ("image", "mask"):
            (flat / sub).mkdir(parents=True)
        for r in rows:
            if r["set"] == "REFUGE_train":
                for sub in ("image", "mask"):
                    hit = next(Path(args.regions).glob(f"*/ROIs/{sub}/{r['case']}.png"))
                    shutil.copy(hit, flat / sub / hit.name)
        evaluate.main(["--workdir", w, "--data", str(flat), "--name", "region_REFUGE_train",
                       "--framing=region", "--overwrite"])  # fmt: skip
    region = review(w, "region_REFUGE_train")
    for r in rows:
        if r["case"] in region:
            r["region_od_dice"] = float(region[r["case"]]["dice_OD"])
            r["region_oc_dice"] = float(region[r["case"]]["dice_OC"])

    print(f"\nCPU: {cpu_name()}")
    print("| set | photograph | centre error (disc diameters) | OD Dice | OC Dice | plain resize "
          "OD | region path OD / OC | search s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        reg = (
            f"{r['region_od_dice']:.3f} / {r['region_oc_dice']:.3f}" if "region_od_dice" in r
            else ""
        )  # fmt: skip
        print(
            f"| {r['set']} | {r['case']} | {r['centre_err_diam']:.3f} | {r['od_dice']:.3f} | "
            f"{r['oc_dice']:.3f} | {r['plain_od_dice']:.3f} | {reg} | "
            f"{r['search_seconds']:.1f} |"
        )
    for s in SETS:
        sel = [r for r in rows if r["set"] == s]
        print(
            f"{s}: OD {np.mean([r['od_dice'] for r in sel]):.3f} (plain resize "
            f"{np.mean([r['plain_od_dice'] for r in sel]):.3f}), OC "
            f"{np.mean([r['oc_dice'] for r in sel]):.3f}; command wall time {walls[s]:.0f} s for "
            f"{len(sel)} photographs"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpu": cpu_name(), "rows": rows, "walls": walls}, f, indent=1)


if __name__ == "__main__":
    main()
