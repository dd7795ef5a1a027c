"""The results of finished runs, side by side: the table and what it shows.

    python -m puseg_jax.report W/erm/summary.json W/ours/summary.json

prints the Dice/HD95/ASD table of the runs (`reports.format_table`) and under it a few lines
that say what a reader is looking at (`explain`): the domain gap of each method (source
validation against the unseen target), the methods' difference on the target, and where the
uncertainty is. `./run.sh demo` ends with it.
"""

import json
import sys
from collections.abc import Sequence

from puseg_jax.evaluators import reports
from puseg_jax.runs.explain import explain


def main(argv: Sequence[str] | None = None) -> str:
    """`python -m puseg_jax.report SUMMARY.json...`: prints the table and `explain`.

    Args:
      argv: paths of summary.json files (None: sys.argv[1:]).

    Returns:
      The printed text.
    """
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths or any(p.startswith("-") for p in paths):
        raise SystemExit(
            "Usage: python -m puseg_jax.report RUN/summary.json [RUN2/summary.json ...]"
        )
    summaries = []
    for path in paths:
        try:
            with open(path) as f:
                summaries.append(json.load(f))
        except FileNotFoundError:
            raise SystemExit(f"{path} not found: has that run finished its evaluation?") from None
    text = reports.format_table(summaries) + "\n\n" + explain(summaries)
    print(text)
    return text


if __name__ == "__main__":
    main()
