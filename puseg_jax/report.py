"""Prints the results of finished runs side by side: `python -m puseg_jax.report`.

    python -m puseg_jax.report W/erm/summary.json W/ours/summary.json

reads each run's `summary.json` (written by `python -m puseg_jax.main`), writes nothing, and
prints the Dice/HD95/ASD table of the runs (`reports.format_table`) and under it a few lines
that say what a reader is looking at (`explain`): the domain gap of each method (source
validation against the unseen target), the methods' difference on the target, and where the
uncertainty is. `./run.sh demo` ends with it.
"""

import os
from collections.abc import Sequence

from absl import flags

from puseg_jax.core import cli
from puseg_jax.evaluators import reports
from puseg_jax.runs.explain import explain
from puseg_jax.runs.run_folder import RunFolder

PROG = "python -m puseg_jax.report"


def define_flags(fv: flags.FlagValues) -> None:
    """None: the runs are the positional arguments."""
    del fv


def main(argv: Sequence[str] | None = None) -> str:
    """`python -m puseg_jax.report SUMMARY.json...`: prints the table and `explain`.

    Args:
      argv: paths of summary.json files (None: sys.argv[1:]).

    Returns:
      The printed text.
    """
    _, paths = cli.parse(argv, __doc__, define_flags, PROG)
    if not paths:
        raise cli.usage_error(PROG, "no runs: RUN/summary.json [RUN2/summary.json ...]")
    summaries = []
    for path in paths:
        # A run folder, or its summary.json as the demo passes it: read by the one run reader.
        run = RunFolder(path if os.path.isdir(path) else os.path.dirname(path) or ".")
        if not run.has_summary():
            raise SystemExit(
                f"{run.summary_path()} not found: has that run finished its evaluation?"
            )
        summaries.append(run.summary())
    with cli.console():
        text = reports.format_table(summaries) + "\n\n" + explain(summaries)
        print(text)
    return text


if __name__ == "__main__":
    cli.run(main)
