"""Whole fundus photographs with a trained fundus run: how well `external/photos.py` finds the disc.

For every photograph of ../shared/data/fundus_photos (12, with masks):
  * the located disc centre's distance to the true centre (centroid of the mask's disc), in
    units of the true disc diameter (equivalent diameter), and the flags;
  * OD and OC Dice on the photograph's grid: the located region (training framing) predicted,
    written back (bilinear), thresholded at 0.5, largest component, cup inside disc, as the
    evaluation post-processes;
  * the same Dice with today's plain resize (the whole photograph squashed to the input);
  * time per photograph (search + region prediction; the model compiled beforehand).
For the REFUGE training eyes, the region path too: the DoFE region of the same eye (fundus/
Domain3) predicted and scored on its own 512 grid.

The framing is read from the run's own training masks (its source domains' train split in the
config's manual_dir, which hold the 512 regions the model saw).

    python -m benchmarks.bench_photos --workdir /work/qruns/photos_ours_all4_seed0 [--out F.json]
        [--any_checkpoint]   # the latest 'last' checkpoint even before summary.json exists

Prints a table and the CPU; --out writes the numbers as JSON.
"""

import argparse
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from puseg_jax import evaluate, input_pipeline, metrics, parallel, resample
from puseg_jax.datasets import get_dataset_info
from puseg_jax.external import photos

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores visible)"
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def load_model(workdir: str, any_checkpoint: bool):
    """(model_fn: uint8 [N, s, s, 3] -> (probs [N, s, s, K], uncertainty [N, s, s]), config,
    checkpoint label)."""
    config = evaluate.load_run_config(workdir)
    info = get_dataset_info(config.data.name)
    if any_checkpoint and not os.path.isfile(os.path.join(workdir, "summary.json")):
        folder = os.path.join(workdir, "checkpoints", "last")
        which, step = "last", max(int(d) for d in os.listdir(folder) if d.isdigit())
        label = f"last@{step} (run not finished)"
    else:
        which, step, label = evaluate.reported_checkpoint(workdir)
    mesh = parallel.create_mesh(config.parallel.num_devices)
    state, p_eval_step = evaluate.restore_model(config, info, workdir, which, step, mesh)
    rng = jax.random.key(0)
    mode = config.data.normalize

    def model_fn(regions: np.ndarray):
        # Normalised as input_pipeline.preprocess does for evaluation (per image, no augment).
        images = np.empty(regions.shape, np.float32)
        for i, r in enumerate(regions):
            shift, scale = input_pipeline.normalization_stats(r, mode)
            images[i] = (r.astype(np.float32) * np.float32(1 / 255) - shift) / scale
        batch = parallel.shard_batch({"image": images}, mesh, config.parallel.strategy)
        pred = parallel.to_host(p_eval_step(state, batch, rng))
        return np.asarray(pred["probs"], np.float32), np.asarray(pred["uncertainty"], np.float32)

    return model_fn, config, label


def training_masks(config) -> list[np.ndarray]:
    manual = Path(config.data.manual_dir)
    if not manual.is_absolute():
        manual = (REPO / manual).resolve()
    out = []
    for dom in config.data.source_domains:
        for p in sorted((manual / dom / config.data.train_split / "ROIs" / "mask").glob("*.png")):
            m = photos.read_mask(p)
            h, w = m.shape
            if (h, w) != (512, 512):  # the builder's centre crop (800 originals)
                m = m[(h - 512) // 2 : (h + 512) // 2, (w - 512) // 2 : (w + 512) // 2]
            out.append(m)
    return out


def post_process(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(OD, OC) from sigmoid probabilities [H, W, 2]: threshold, largest component, cup in disc."""
    od = metrics.largest_connected_component(probs[..., 0] > 0.5)
    oc = metrics.largest_connected_component((probs[..., 1] > 0.5) & od)
    return od, oc


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else 1.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--photos", default=str(SHARED / "fundus_photos"))
    ap.add_argument("--out", default="")
    ap.add_argument("--any_checkpoint", action="store_true")
    ap.add_argument("--disc_scales", default="", help="comma-separated; default: the module's")
    ap.add_argument("--stride", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()

    model_fn, config, label = load_model(args.workdir, args.any_checkpoint)
    s = int(config.data.image_size)
    framing = photos.training_framing(training_masks(config))
    print(f"checkpoint {label}; input {s}; framing: {framing.describe()}", flush=True)

    def predict_fn(regions):
        p, u = model_fn(regions)
        return p[..., 0], u

    kwargs = {"stride": args.stride, "batch_size": args.batch}
    if args.disc_scales:
        kwargs["disc_scales"] = tuple(float(x) for x in args.disc_scales.split(","))
    # Compile at every batch size used (search batches, single region) before timing.
    for b in photos.batch_sizes(args.batch) + [1]:
        model_fn(np.zeros((b, s, s, 3), np.uint8))

    rows = []
    for path in sorted(Path(args.photos).glob("*/image/*.png")):
        photo = photos.read_photo(path)
        mask = photos.check_mask(
            photos.read_mask(path.parent.parent / "mask" / path.name), photo.shape
        )
        od_true, oc_true = mask < 255, mask == 0
        rr, cc = np.nonzero(od_true)
        true_c, true_d = (rr.mean(), cc.mean()), photos.equivalent_diameter(od_true.sum())
        decision = photos.is_photograph(photo)

        t0 = time.perf_counter()
        loc = photos.locate_disc(photo, predict_fn, framing, s, name=path.stem, **kwargs)
        row = {
            "set": path.parent.parent.name,
            "case": path.stem,
            "photograph": decision.is_photograph,
        }
        if loc.box is not None:
            probs, _ = model_fn(photos.crop_region(photo, loc.box, s)[None])
            full = photos.paste_back(probs[0], loc.box, photo.shape)
            od, oc = post_process(full)
            row.update(od_dice=dice(od, od_true), oc_dice=dice(oc, oc_true))
            row["centre_err_diam"] = math.dist(loc.centre, true_c) / true_d
            row["diameter_ratio"] = loc.diameter / true_d
        seconds = time.perf_counter() - t0
        # Today's plain resize: the whole photograph squashed to the input, back bilinearly.
        h, w = photo.shape[:2]
        squashed = np.asarray(Image.fromarray(photo).resize((s, s), Image.BILINEAR))
        p_plain, _ = model_fn(squashed[None])
        od_p, _ = post_process(resample.resize_bilinear(p_plain[0], (h, w)))
        row.update(
            plain_od_dice=dice(od_p, od_true),
            seconds=seconds,
            search_seconds=loc.seconds,
            windows=loc.n_windows,
            confidence=loc.confidence,
            flags="|".join(loc.flags),
            message=loc.message(),
        )
        rows.append(row)
        print(
            f"{row['set']:>12} {row['case']:>11}  err {row.get('centre_err_diam', math.nan):.3f} d"
            f"  OD {row.get('od_dice', math.nan):.3f} OC {row.get('oc_dice', math.nan):.3f}"
            f"  plain OD {row['plain_od_dice']:.3f}  {seconds:.2f} s ({loc.n_windows} windows)"
            f"  conf {loc.confidence:.2f} {row['flags']}",
            flush=True,
        )

    # The region path on the same eyes (REFUGE training photographs = fundus/Domain3 regions).
    region_rows = {}
    manual = Path(config.data.manual_dir)
    manual = manual if manual.is_absolute() else (REPO / manual).resolve()
    for r in rows:
        if r["set"] != "REFUGE_train":
            continue
        hits = list((manual / "Domain3").glob(f"*/ROIs/image/{r['case']}.png"))
        if not hits:
            continue
        region = photos.read_photo(hits[0])
        rmask = photos.read_mask(hits[0].parent.parent / "mask" / hits[0].name)
        probs, _ = model_fn(photos.resize_rgb(region, s)[None])
        od, oc = post_process(resample.resize_bilinear(probs[0], rmask.shape))
        region_rows[r["case"]] = {
            "split": hits[0].parent.parent.parent.name,
            "od_dice": dice(od, rmask < 255),
            "oc_dice": dice(oc, rmask == 0),
        }
        print(
            f"region path {r['case']} ({region_rows[r['case']]['split']}): OD "
            f"{region_rows[r['case']]['od_dice']:.3f} OC {region_rows[r['case']]['oc_dice']:.3f}"
            f"  | photograph path OD {r.get('od_dice', math.nan):.3f} OC "
            f"{r.get('oc_dice', math.nan):.3f}"
        )

    errs = [r.get("centre_err_diam", math.inf) for r in rows]
    summary = {
        "checkpoint": label,
        "workdir": args.workdir,
        "cpu": cpu_name(),
        "framing": framing.__dict__,
        "locate_kwargs": kwargs,
        "within_quarter_diameter": int(sum(e <= 0.25 for e in errs)),
        "n": len(rows),
        "max_centre_err_diam": float(max(errs)),
        "median_seconds": float(np.median([r["seconds"] for r in rows])),
        "rows": rows,
        "region_path": region_rows,
    }
    for name in ("PAPILA", "REFUGE_val", "REFUGE_train"):
        sel = [r for r in rows if r["set"] == name]
        summary[f"{name}_mean_od_dice"] = float(np.mean([r.get("od_dice", 0.0) for r in sel]))
        summary[f"{name}_mean_plain_od_dice"] = float(np.mean([r["plain_od_dice"] for r in sel]))
    print(
        f"located within 1/4 diameter: {summary['within_quarter_diameter']}/{len(rows)}, max "
        f"error {summary['max_centre_err_diam']:.3f} d; median {summary['median_seconds']:.2f} s "
        f"per photograph on {summary['cpu']}"
    )
    for name in ("PAPILA", "REFUGE_val", "REFUGE_train"):
        print(
            f"{name}: OD Dice {summary[name + '_mean_od_dice']:.3f} (plain resize "
            f"{summary[name + '_mean_plain_od_dice']:.3f})"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1, default=str)


if __name__ == "__main__":
    main()
