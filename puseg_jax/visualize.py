"""`python -m puseg_jax.visualize`: PNG panels and figures of a trained workdir.

    python -m puseg_jax.visualize --workdir W --domain D --out DIR [--cases N] [--compare W2]

writes, per domain, one titled panel per case (`panel_<i>_<case>.png`, drawn as evaluation
draws `eval/<name>/panel_*.png` and the TensorBoard images), a contact sheet of those cases with
their Dice (`contact_sheet.png`), for volumes a grid over the slices of each case
(`slices_<case>.png`) and, with `--compare`, the same cases under a second run side by side.
See `main` for every option. The drawing is `puseg_jax.drawing.panels`; the figures are
`puseg_jax.runs.workdir_figures` (the notebook's helpers).
"""

import argparse
import os
from collections.abc import Sequence

from puseg_jax.drawing import figures, panels
from puseg_jax.evaluators import case_panels
from puseg_jax.runs import workdir, workdir_figures


def write_domain_pngs(
    wd,
    name: str,
    out_dir: str,
    num_cases: int,
    order: str = "first",
    compare=None,
) -> list[str]:
    """Writes the PNGs of one evaluated domain of a workdir into `out_dir/<name>/`.

    Args:
      wd: an `workdir.Workdir`.
      name: the evaluator (eval/<name>).
      out_dir: output folder.
      num_cases: cases shown (panels and contact sheet).
      order: which cases, see `workdir.select_cases`.
      compare: another `Workdir` (e.g. the 'erm' run); adds `compare_<method>.png` with the
        same cases under both runs.

    Returns:
      The paths written.
    """
    dest = os.path.join(out_dir, name)
    os.makedirs(dest, exist_ok=True)
    pred = workdir.load_predictions(wd, name)
    per_case = workdir.load_per_case(wd, name)
    cases = workdir.select_cases(pred, per_case, wd.info, num_cases, order)
    # The header of evaluation's own panels, from the step the reports were written at.
    title = case_panels.panel_title(wd.method, name, wd.role(name), wd.evals[name].get("step"))
    written = []
    for i, (case_id, idx) in enumerate(cases):
        dice = {s: m["dice"] for s, m in per_case[case_id].items()}
        path = os.path.join(dest, f"panel_{i}_{case_id}.png")
        panel = case_panels.draw_case(pred, case_id, idx, dice, wd.info, wd.config, title)
        panels.save_png(panel, path)
        written.append(path)
        if wd.info.volumetric:
            fig = workdir_figures.slice_grid_figure(wd, name, pred, per_case, case_id)
            written.append(figures.save_figure(fig, os.path.join(dest, f"slices_{case_id}")))
    fig = workdir_figures.cases_figure(wd, name, pred, per_case, cases)
    written.append(figures.save_figure(fig, os.path.join(dest, "contact_sheet")))
    if compare is not None:
        fig = workdir_figures.compare_figure(compare, wd, name, [c for c, _ in cases])
        path = os.path.join(dest, f"compare_{compare.method}_{wd.method}")
        written.append(figures.save_figure(fig, path))
    return written


def main(argv: Sequence[str] | None = None) -> list[str]:
    """`python -m puseg_jax.visualize`: PNG panels and a contact sheet from a workdir.

    Args:
      argv: command-line arguments (None: sys.argv[1:]).

    Returns:
      The paths written.
    """
    parser = argparse.ArgumentParser(
        prog="python -m puseg_jax.visualize",
        description="Writes PNG panels (image | ground truth | prediction | uncertainty | "
        "errors) and a contact sheet per evaluated domain of a workdir.",
    )
    parser.add_argument("--workdir", required=True, help="a training workdir")
    parser.add_argument(
        "--domain",
        action="append",
        help="evaluator name (eval/<name>); repeat for several; default: every evaluated one",
    )
    parser.add_argument("--out", required=True, help="output folder (one subfolder per domain)")
    parser.add_argument("--cases", type=int, default=4, help="cases per domain (default 4)")
    parser.add_argument(
        "--order",
        default="first",
        choices=("first", "worst", "best", "most_uncertain"),
        help="which cases: the first ones (as in TensorBoard), the lowest or highest Dice, or "
        "the highest mean uncertainty",
    )
    parser.add_argument(
        "--compare",
        default="",
        help="a second workdir of the same data (e.g. the erm run): adds a side-by-side figure",
    )
    parser.add_argument(
        "--evaluate_if_missing",
        action="store_true",
        help="evaluate the checkpoint first when predictions.npz is missing (needs the data)",
    )
    args = parser.parse_args(argv)
    wd = workdir.open_workdir(args.workdir, evaluate_if_missing=args.evaluate_if_missing)
    other = None
    if args.compare:
        other = workdir.open_workdir(args.compare, evaluate_if_missing=args.evaluate_if_missing)
    names = args.domain or wd.eval_names
    written = []
    for name in names:
        written += write_domain_pngs(wd, name, args.out, args.cases, args.order, other)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
