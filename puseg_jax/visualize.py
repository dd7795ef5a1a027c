"""Draws PNG panels and figures of a trained workdir: `python -m puseg_jax.visualize`.

    python -m puseg_jax.visualize --workdir W --out DIR [--domain D ...] [--cases N]
        [--order first|worst|best|most_uncertain] [--compare W2] [--evaluate_if_missing]

writes into `DIR/<domain>/`, per evaluated domain of W (`--domain`, repeated, picks some): one
titled panel per case (`panel_<i>_<case>.png`, drawn as evaluation draws `eval/<name>/panel_*.png`
and the TensorBoard images), a contact sheet of those cases with their Dice
(`contact_sheet.png`), for volumes a grid over the slices of each case (`slices_<case>.png`)
and, with `--compare`, the same cases under a second run side by side
(`compare_<method2>_<method>.png`). It reads W's `eval/<domain>/predictions.npz` and
`per_case.csv` (with `--evaluate_if_missing`, a workdir without them is evaluated first, which
needs its data) and prints the paths it wrote. The drawing is `puseg_jax.drawing.panels`; the
figures are `puseg_jax.runs.workdir_figures` (the notebook's helpers).
"""

import os
from collections.abc import Sequence

from absl import flags

from puseg_jax.core import cli
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


PROG = "python -m puseg_jax.visualize"


def define_flags(fv: flags.FlagValues) -> None:
    """The flags of `main`, on `fv`."""
    flags.DEFINE_string("workdir", None, "a training workdir", flag_values=fv, required=True)
    flags.DEFINE_string(
        "out", None, "output folder (one subfolder per domain)", flag_values=fv, required=True
    )
    flags.DEFINE_multi_string(
        "domain",
        None,
        "evaluator name (eval/<name>); repeat for several; default: every evaluated one",
        flag_values=fv,
    )
    flags.DEFINE_integer("cases", 4, "cases per domain", lower_bound=1, flag_values=fv)
    flags.DEFINE_enum(
        "order",
        "first",
        ["first", "worst", "best", "most_uncertain"],
        "which cases: the first ones (as in TensorBoard), the lowest or highest Dice, or the "
        "highest mean uncertainty",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "compare",
        "",
        "a second workdir of the same data (e.g. the erm run): adds a side-by-side figure",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "evaluate_if_missing",
        False,
        "evaluate the checkpoint first when predictions.npz is missing (needs the data)",
        flag_values=fv,
    )


def main(argv: Sequence[str] | None = None) -> list[str]:
    """`python -m puseg_jax.visualize`: PNG panels and a contact sheet from a workdir.

    Args:
      argv: command-line arguments, program name excluded (None: sys.argv[1:]).

    Returns:
      The paths written.
    """
    fv, args = cli.parse(argv, __doc__, define_flags, PROG)
    cli.no_positional(args, PROG)
    # An evaluation (--evaluate_if_missing) writes into the workdir: its log.txt gets the log.
    with cli.console(fv.workdir if fv.evaluate_if_missing else None):
        wd = workdir.open_workdir(fv.workdir, evaluate_if_missing=fv.evaluate_if_missing)
        other = None
        if fv.compare:
            other = workdir.open_workdir(fv.compare, evaluate_if_missing=fv.evaluate_if_missing)
        written = []
        for name in fv.domain or wd.eval_names:
            written += write_domain_pngs(wd, name, fv.out, fv.cases, fv.order, other)
        for path in written:
            print(path)
    return written


if __name__ == "__main__":
    cli.run(main)
