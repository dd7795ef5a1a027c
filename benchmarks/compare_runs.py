"""Two run folders of the same config, compared: every number of their summaries (overall and
per evaluator) within a tolerance, and every array of their predictions.npz equal.

  python -m benchmarks.compare_runs RUN_A RUN_B [--atol 1e-6]

Used to check that a refactor leaves a run's results unchanged (the same config and seed, run
before and after the change on the same machine). Exit status 1 on any difference.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np


def _numbers(tree, prefix=""):
    """{dotted key: float} of every number in a JSON tree (bools and strings left out)."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out |= _numbers(v, f"{prefix}{k}.")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out |= _numbers(v, f"{prefix}{i}.")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix[:-1]] = float(tree)
    return out


def compare(a: Path, b: Path, atol: float) -> list[str]:
    """The differences between run folders `a` and `b`, as lines (empty: the same)."""
    problems = []
    summaries = sorted(p.relative_to(a) for p in a.glob("**/summary.json"))
    if not summaries:
        problems.append(f"no summary.json under {a}")
    for rel in summaries:
        if not (b / rel).is_file():
            problems.append(f"{rel}: missing in {b}")
            continue
        na, nb = (_numbers(json.loads((r / rel).read_text())) for r in (a, b))
        for key in sorted(set(na) | set(nb)):
            if key not in na or key not in nb:
                problems.append(f"{rel}:{key}: only in one run")
                continue
            x, y = na[key], nb[key]
            if (math.isnan(x) and math.isnan(y)) or abs(x - y) <= atol:
                continue
            problems.append(f"{rel}:{key}: {x!r} vs {y!r}")
    for pa in sorted(a.glob("eval/*/predictions.npz")):
        pb = b / pa.relative_to(a)
        if not pb.is_file():
            problems.append(f"{pa.relative_to(a)}: missing in {b}")
            continue
        with np.load(pa) as fa, np.load(pb) as fb:
            if set(fa.files) != set(fb.files):
                problems.append(
                    f"{pa.relative_to(a)}: keys {sorted(fa.files)} vs {sorted(fb.files)}"
                )
            for k in sorted(set(fa.files) & set(fb.files)):
                if not np.array_equal(fa[k], fb[k], equal_nan=fa[k].dtype.kind == "f"):
                    problems.append(f"{pa.relative_to(a)}:{k}: arrays differ")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--atol", type=float, default=1e-6)
    args = parser.parse_args(argv)
    problems = compare(args.run_a, args.run_b, args.atol)
    n = len(list(args.run_a.glob("**/summary.json")))
    m = len(list(args.run_a.glob("eval/*/predictions.npz")))
    if problems:
        print("\n".join(problems))
        print(f"[compare] {len(problems)} difference(s)")
        return 1
    print(f"[compare] the same: {n} summaries within {args.atol}, {m} predictions.npz equal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
