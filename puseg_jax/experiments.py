"""The leave-one-domain-out suite: every (target, variant, seed) run, then one results table.

  python -m puseg_jax.experiments FAMILY [METHOD ...] [--targets T ...] [--seeds 0 1 2]
      [--budget cpu|paper] [--nifti] [--root workdirs/experiments] [--manual-dir DIR]
      [--data-dir DIR] [--dry-run] [--config.FIELD=VALUE ...]
  python -m puseg_jax.experiments table FAMILY [--budget ...] [--nifti] [--compare A:B ...]
      [--choose] [METHOD/VARIANT ...] [--targets ...] [--seeds ...]

FAMILY is `fundus` (targets Domain1..4) or `prostate` (RUNMC, BMC, I2CVB, UCL, BIDMC, HK).
Each run trains on the other domains of the family and is evaluated on the held-out target
(`configs/<family>.py:<TARGET>[,cpu][,nifti]`), in its own workdir

  <root>/<family>/<suite>/<target>/<variant>/seed<k>

named by everything that distinguishes it: the suite is the budget and data layout (`cpu`,
`paper`, `cpu_nifti`, ...), the variant is the method followed by every `--config.*` override
that changes the computation (`ours__loss.lambda_max=3`; overrides listed in
`config_diff.INCIDENTAL_FIELDS`, such as data paths, do not count). So a `paper` suite never
reuses a `cpu` run, and a table never mixes suites or variants. A run whose `summary.json`
exists is skipped, so an interrupted suite resumes where it stopped (a run interrupted midway
resumes from its own checkpoint, which refuses a changed config). Each run is a separate
`python -m puseg_jax.main` process: a failure is recorded and the suite goes on. Each workdir
gets `run.json` (what the run is) and `wall_time.json`.

At the end (or with `table` alone) every finished run of the suite is aggregated into
`<root>/<family>/<suite>/results.md` (and `results.json`): per target and variant, mean +-
standard deviation over seeds of the target's Dice, HD95 and ASD per structure, the uncertainty
quality and the source-validation scores; then paired comparisons (`--compare A:B`, default
`ours:erm`): per-case Dice differences of A and B run with the same seed, with a 95% interval
over seeds and cases (`stats.paired_interval`) and the per-seed mean differences. A comparison
says "better" or "worse" only when its interval excludes zero (never from one seed). `--choose`
adds, per target, the choice of the default `ours` variant from that target's runs and their
source validation alone (`choice.choose_per_target`).
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from puseg_jax.model import losses
from puseg_jax.runs.suite import FAMILIES, REPO_ROOT, plan_runs, run_suite, suite_name
from puseg_jax.runs.tables import write_results


def parse_compare(pairs: Sequence[str] | None) -> list[tuple[str, str]]:
    """['ours:erm'] -> [('ours', 'erm')]."""
    out = []
    for p in pairs or ():
        a, sep, b = p.partition(":")
        if not sep or not a or not b:
            raise ValueError(f"--compare takes A:B (variant names), got {p!r}")
        out.append((a, b))
    return out


# ---------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(options, `--config.*` overrides forwarded to every run)."""
    parser = argparse.ArgumentParser(
        prog="python -m puseg_jax.experiments",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "words",
        nargs="+",
        metavar="[table] FAMILY [METHOD ...]",
        help="family (fundus | prostate) then methods (default: all); a leading 'table' only "
        "aggregates the finished runs (then the names may also be variants)",
    )
    parser.add_argument("--targets", nargs="+", default=None, help="held-out domains (all)")
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=None, help="seeds to run (0); table: all found"
    )
    parser.add_argument("--budget", choices=("cpu", "paper"), default="cpu")
    parser.add_argument("--nifti", action="store_true", help="prostate: the SAML NIfTI release")
    parser.add_argument("--root", default=str(REPO_ROOT / "workdirs" / "experiments"))
    parser.add_argument(
        "--manual-dir",
        default=None,
        help="the downloaded release (default: ../shared/data/<fundus|prostate_slices> when "
        "present)",
    )
    parser.add_argument("--data-dir", default="", help="TFDS data dir (default: the config's)")
    parser.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="A:B",
        help="variant pairs for the paired comparison (default ours:erm)",
    )
    parser.add_argument(
        "--choose",
        action="store_true",
        help="add the choice of the default per target, from that target's runs on their source "
        "validation only",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--table", action="store_true", help="only aggregate")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    words = list(args.words)
    if words[0] == "table":
        args.table = True
        words = words[1:]
    if not words:
        parser.error("missing FAMILY")
    args.family, args.methods = words[0], words[1:] or None
    try:
        args.compare = parse_compare(args.compare)
    except ValueError as e:
        parser.error(str(e))
    return args, rest


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the suite (unless `table`), then writes and prints the results table."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.family not in FAMILIES:
        raise SystemExit(f"Unknown family {args.family!r}; expected one of {sorted(FAMILIES)}")
    suite = suite_name(args.budget, args.nifti)
    failed = []
    report = dict(compare=args.compare or None, choose=args.choose)
    if args.table:
        # Only what was asked for; by default every finished run of the suite.
        text = write_results(
            args.root, args.family, suite, args.methods, args.targets, args.seeds, **report
        )
    else:
        targets = args.targets or list(FAMILIES[args.family]["targets"])
        manual_dir = args.manual_dir
        if manual_dir is None and not args.nifti:
            default_dir = FAMILIES[args.family]["manual_dir"]
            manual_dir = str(default_dir) if default_dir.is_dir() else ""
        runs = plan_runs(
            args.family,
            args.methods or list(losses.METHODS),
            targets,
            args.seeds or [0],
            args.root,
            budget=args.budget,
            nifti=args.nifti,
            manual_dir=manual_dir or "",
            data_dir=args.data_dir,
            overrides=overrides,
        )
        failed = run_suite(runs, dry_run=args.dry_run)
        if args.dry_run:
            return 0
        # The report covers every finished run of the suite, this invocation's and earlier ones.
        text = write_results(args.root, args.family, suite, **report)
    print(text)
    print(f"[experiments] written to {Path(args.root) / args.family / suite / 'results.md'}")
    if failed:
        print(f"[experiments] {len(failed)} run(s) failed (see their log.txt):", file=sys.stderr)
        for run in failed:
            print(f"  {run['workdir']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
