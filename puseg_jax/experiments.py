"""Runs a leave-one-domain-out suite, then writes its table: `python -m puseg_jax.experiments`.

  python -m puseg_jax.experiments FAMILY [METHOD ...] [--targets=T1,T2] [--seeds=0,1,2]
      [--budget cpu|paper] [--nifti] [--root workdirs/experiments] [--manual_dir DIR]
      [--data_dir DIR] [--dry_run] [--config.FIELD=VALUE ...]
  python -m puseg_jax.experiments table FAMILY [METHOD/VARIANT ...] [--budget ...] [--nifti]
      [--compare=A:B,C:D] [--choose] [--per_run] [--targets=...] [--seeds=...]

Lists are comma-separated (`--targets=Domain1,Domain3`).

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
source validation alone (`choice.choose_per_target`); `--per_run` adds one row per run (its
seed's source-validation and target scores).
"""

import sys
from collections.abc import Sequence
from pathlib import Path

from absl import flags

from puseg_jax.core import cli
from puseg_jax.model import losses
from puseg_jax.runs.suite import FAMILIES, REPO_ROOT, plan_runs, run_suite, suite_name
from puseg_jax.runs.tables import write_results

PROG = "python -m puseg_jax.experiments"
CONFIG_OVERRIDE = "--config."


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


def define_flags(fv: flags.FlagValues) -> None:
    """The flags of the suite and of its table, on `fv`."""
    flags.DEFINE_list(
        "targets", None, "held-out domains (default: all of the family)", flag_values=fv
    )
    flags.DEFINE_list(
        "seeds", None, "seeds to run (default 0); table: default all found", flag_values=fv
    )
    flags.register_validator(
        "seeds",
        lambda seeds: seeds is None or all(s.lstrip("-").isdigit() for s in seeds),
        "--seeds takes integers: --seeds=0,1,2",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "budget", "cpu", ["cpu", "paper"], "the configs' budget (suite name)", flag_values=fv
    )
    flags.DEFINE_bool("nifti", False, "prostate: the SAML NIfTI release", flag_values=fv)
    flags.DEFINE_string(
        "root",
        str(REPO_ROOT / "workdirs" / "experiments"),
        "root of the suites: runs in ROOT/FAMILY/SUITE/TARGET/VARIANT/seedK, the table in "
        "ROOT/FAMILY/SUITE/results.{md,json}",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "manual_dir",
        None,
        "the downloaded release (default: ../shared/data/<fundus|prostate_slices> when present)",
        flag_values=fv,
    )
    flags.DEFINE_string("data_dir", "", "TFDS data dir (default: the config's)", flag_values=fv)
    flags.DEFINE_list(
        "compare",
        None,
        "variant pairs A:B for the paired comparison (default ours:erm)",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "choose",
        False,
        "add the choice of the default per target, from that target's runs on their source "
        "validation only",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "per_run", False, "add one row per run to the table (seed by seed)", flag_values=fv
    )
    flags.DEFINE_bool("dry_run", False, "print the commands only", flag_values=fv)
    flags.DEFINE_bool("table", False, "only aggregate (as the word `table`)", flag_values=fv)


def _check_words(words: list[str], family: str) -> None:
    """Refuses names that are a list flag's values written with spaces (`--targets A B`)."""
    for word in words:
        if word in FAMILIES[family]["targets"]:
            hint = f"a target? --targets takes a comma-separated list: --targets=A,{word}"
        elif word.lstrip("-").isdigit():
            hint = f"a seed? --seeds takes a comma-separated list: --seeds=0,{word}"
        elif ":" in word:
            hint = f"a pair? --compare takes a comma-separated list: --compare=A:B,{word}"
        else:
            continue
        raise cli.usage_error(PROG, f"{word!r} is not a method or variant ({hint})")


def parse_args(argv: Sequence[str] | None) -> tuple[dict, list[str]]:
    """The command line: (options, `--config.FIELD=VALUE` overrides forwarded to every run).

    Args:
      argv: command-line arguments, program name excluded (None: sys.argv[1:]).

    Returns:
      The options (table, family, methods, targets, seeds, budget, nifti, root, manual_dir,
      data_dir, compare, choose, per_run, dry_run) and the overrides.
    """
    # known_only: the `--config.*` overrides are the runs' flags, not this command's.
    fv, rest = cli.parse(argv, __doc__, define_flags, PROG, known_only=True)
    overrides = [a for a in rest if a.startswith(CONFIG_OVERRIDE)]
    others = [a for a in rest if a.startswith("-") and a not in overrides]
    if others:
        # absl's own message for them, with its suggestions (--manual-dir: manual_dir?).
        cli.parse(others, __doc__, define_flags, PROG)
    spaced = [a for a in overrides if "=" not in a]
    if spaced:
        raise cli.usage_error(PROG, f"write the overrides as --config.FIELD=VALUE: {spaced}")
    words = [a for a in rest if not a.startswith("-")]
    options = {name: fv[name].value for name in fv if name == fv[name].name}
    if words[:1] == ["table"]:
        options["table"] = True
        words = words[1:]
    if not words:
        raise cli.usage_error(PROG, "missing FAMILY (fundus | prostate)")
    family, methods = words[0], words[1:]
    if family not in FAMILIES:
        raise cli.usage_error(
            PROG, f"unknown family {family!r}; expected one of {sorted(FAMILIES)}"
        )
    _check_words(methods, family)
    try:
        compare = parse_compare(options["compare"])
    except ValueError as e:
        raise cli.usage_error(PROG, str(e)) from None
    options.update(
        family=family,
        methods=methods or None,
        seeds=[int(s) for s in options["seeds"]] if options["seeds"] else None,
        compare=compare,
    )
    return options, overrides


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m puseg_jax.experiments`: runs the suite (unless `table`), then writes and
    prints the results table.

    Args:
      argv: command-line arguments, program name excluded (None: sys.argv[1:]).

    Returns:
      The exit status: 1 when a run failed.
    """
    args, overrides = parse_args(argv)
    family = args["family"]
    suite = suite_name(args["budget"], args["nifti"])
    failed = []
    report = dict(compare=args["compare"] or None, choose=args["choose"], per_run=args["per_run"])
    with cli.console():
        if args["table"]:
            # Only what was asked for; by default every finished run of the suite.
            text = write_results(
                args["root"],
                family,
                suite,
                args["methods"],
                args["targets"],
                args["seeds"],
                **report,
            )
        else:
            manual_dir = args["manual_dir"]
            if manual_dir is None and not args["nifti"]:
                default_dir = FAMILIES[family]["manual_dir"]
                manual_dir = str(default_dir) if default_dir.is_dir() else ""
            runs = plan_runs(
                family,
                args["methods"] or list(losses.METHODS),
                args["targets"] or list(FAMILIES[family]["targets"]),
                args["seeds"] or [0],
                args["root"],
                budget=args["budget"],
                nifti=args["nifti"],
                manual_dir=manual_dir or "",
                data_dir=args["data_dir"],
                overrides=overrides,
            )
            failed = run_suite(runs, dry_run=args["dry_run"])
            if args["dry_run"]:
                return 0
            # The report covers every finished run of the suite, this invocation's and earlier
            # ones.
            text = write_results(args["root"], family, suite, **report)
        print(text)
        print(f"[experiments] written to {Path(args['root']) / family / suite / 'results.md'}")
        if failed:
            print(
                f"[experiments] {len(failed)} run(s) failed (see their log.txt):", file=sys.stderr
            )
            for run in failed:
                print(f"  {run['workdir']}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    cli.run(main)
