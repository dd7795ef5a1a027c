"""Source-validation learning curves of several runs, one figure (docs/results.md, budget).

  python -m benchmarks.plot_curves --out docs/figures/fundus_cpu_budget_curves.png \\
      LABEL=RUN_DIR [LABEL=RUN_DIR ...]

Prints the table of pooled source-validation Dice (OD, OC, mean) per evaluation step and draws
the mean and both structures against the step. Only source-validation evaluators are read.

With --diagnostics it draws instead how strong the highlighting was over training (the
`loss.diagnostics_every_steps` keys of metrics.jsonl, docs/method.md): the gradient's share on
the 10 % most uncertain pixels and on the boundary band, and the overlap of those pixels with
the band, and prints the table at every --every-th measurement. There a LABEL may name several
runs, `LABEL=RUN_DIR,RUN_DIR,...` (the seeds of one arm): the line is their mean at the steps
all of them measured, the shaded band their range, and the table the mean.
"""

import argparse

import numpy as np
from matplotlib.figure import Figure

from puseg_jax.runs.curves import diagnostics_curve, source_val_curve

_DIAGNOSTICS = (
    ("grad_share_top10u", "gradient share, 10% most uncertain pixels"),
    ("grad_share_band", "gradient share, boundary band"),
    ("top10u_band_overlap", "10% most uncertain pixels in the band"),
)


def seed_curves(paths: list[str]) -> tuple[list[int], dict[str, np.ndarray]]:
    """The diagnostics of several runs at the steps all of them measured.

    Returns:
      (steps, {key: array [runs, steps]}) for every key of `_DIAGNOSTICS` and 'band_fraction'.
    """
    curves = []
    for path in paths:
        curve = dict(diagnostics_curve(path))
        if not curve:
            raise SystemExit(f"{path}: no diagnostics in metrics.jsonl")
        curves.append(curve)
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    keys = [k for k, _ in _DIAGNOSTICS] + ["band_fraction"]
    return steps, {k: np.array([[c[step][k] for step in steps] for c in curves]) for k in keys}


def plot_diagnostics(runs: list[str], out: str, every: int) -> None:
    """The highlighting diagnostics of each run (or mean of each group of runs) against the step,
    one panel per key."""
    fig = Figure(figsize=(10, 3.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(_DIAGNOSTICS))
    print(
        "| run | runs | step | "
        + " | ".join(title for _, title in _DIAGNOSTICS)
        + " | band / all |"
    )
    print("|---|---:|---:|" + "---:|" * (len(_DIAGNOSTICS) + 1))
    for spec in runs:
        label, paths = spec.split("=", 1)
        paths = paths.split(",")
        steps, values = seed_curves(paths)
        mean = {k: v.mean(axis=0) for k, v in values.items()}
        n = len(paths)
        for i, step in enumerate(steps):
            if i % every == 0 or i == len(steps) - 1:
                cells = [f"{mean[k][i]:.3f}" for k, _ in _DIAGNOSTICS]
                band = f"{mean['band_fraction'][i]:.3f}"
                print(f"| {label} | {n} | {step} | " + " | ".join(cells) + f" | {band} |")
        for ax, (key, _) in zip(axes, _DIAGNOSTICS, strict=True):
            (line,) = ax.plot(steps, mean[key], lw=1, label=label if n == 1 else f"{label} ({n})")
            if n > 1:
                lo, hi = values[key].min(axis=0), values[key].max(axis=0)
                ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    for ax, (_, title) in zip(axes, _DIAGNOSTICS, strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(out)
    print(f"wrote {out}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", nargs="+", help="LABEL=RUN_DIR (--diagnostics: LABEL=RUN_DIR[,RUN_DIR...])"
    )
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument(
        "--diagnostics", action="store_true", help="the highlighting diagnostics, not the Dice"
    )
    parser.add_argument("--every", type=int, default=10, help="--diagnostics: table row stride")
    args = parser.parse_args(argv)
    if args.diagnostics:
        plot_diagnostics(args.runs, args.out, args.every)
        return
    fig = Figure(figsize=(10, 3.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, 3)
    print("| run | step | OD Dice | OC Dice | mean |")
    print("|---|---:|---:|---:|---:|")
    for spec in args.runs:
        label, path = spec.split("=", 1)
        curve = source_val_curve(path)
        for step, scores in curve:
            print(
                f"| {label} | {step} | {scores['OD/dice']:.4f} | {scores['OC/dice']:.4f} "
                f"| {scores['dice']:.4f} |"
            )
        steps = [step for step, _ in curve]
        for ax, key in zip(axes, ("dice", "OD/dice", "OC/dice"), strict=True):
            ax.plot(steps, [scores[key] for _, scores in curve], marker="o", ms=3, label=label)
    for ax, title in zip(axes, ("mean of OD and OC", "OD", "OC"), strict=True):
        ax.set_title(f"source-validation Dice, {title}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
