"""Source-validation learning curves of several runs, one figure (docs/results.md, budget).

  python -m benchmarks.plot_curves --out docs/figures/fundus_cpu_budget_curves.png \\
      LABEL=RUN_DIR [LABEL=RUN_DIR ...]

Prints the table of pooled source-validation Dice (OD, OC, mean) per evaluation step and draws
the mean and both structures against the step. Only source-validation evaluators are read.
"""

import argparse

from matplotlib.figure import Figure

from puseg_jax.runs.curves import source_val_curve


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
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
