"""The one style of every `python -m puseg_jax.<name>` command line: absl flags, `--help`,
usage errors, and the console of `main.py`.

A command line module has three parts:

    def define_flags(fv: flags.FlagValues) -> None: ...   # its flags, on the given instance

    def main(argv=None):
        fv, args = cli.parse(argv, __doc__, define_flags, "python -m puseg_jax.<name>")
        with cli.console(workdir):  # log.txt and the quiet console, as a training run has them
            ...

    if __name__ == "__main__":
        cli.run(main)

Each call of `main` parses into a fresh `flags.FlagValues`: several command lines live in one
process (the tests call their `main([...])` one after the other) without defining a flag twice
or keeping a value from an earlier call. absl's own flags (`--verbosity`, `--logtostderr`,
`--log_dir`, ...) stay on absl's global `FLAGS`, which `run` parses on the real command line
before `main` sees the rest, so `--verbosity=0` (or `PUSEG_VERBOSE=1`) means for every command
what it means for training: the libraries' log lines on the console too.
"""

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from absl import app, flags

from puseg_jax.core import logging_utils

# Asked for help: printed to stdout, exit status 0 (absl's own --help exits with 1).
HELP_ARGS = ("--help", "-h", "--helpshort", "-?", "--helpfull")

DefineFlags = Callable[[flags.FlagValues], None]


def _args_before_separator(argv: Sequence[str]) -> list[str]:
    argv = list(argv)
    return argv[: argv.index("--")] if "--" in argv else argv


def wants_help(argv: Sequence[str]) -> bool:
    """Whether the command line asks for help (`--help`, `-h`, `--helpshort`, `--helpfull`)."""
    return any(a in HELP_ARGS for a in _args_before_separator(argv))


def help_text(doc: str, fv: flags.FlagValues, full: bool = False) -> str:
    """The module's docstring, its flags, and how to see more.

    Args:
      doc: the command line module's docstring (what it does, where it writes).
      fv: its flags.
      full: add absl's own flags (logging, debugging).

    Returns:
      The text `--help` prints.
    """
    lines = [doc.strip(), "", "flags:"]
    for name in fv:  # in the order they were defined, the required ones first
        # Each flag once (absl holds a flag with a short name under both names).
        if name == fv[name].name:
            lines.append(_flag_help(fv[name]))
    lines.append("")
    lines.append(
        flags.text_wrap(
            "absl's flags are accepted too: --verbosity=0 (or PUSEG_VERBOSE=1) adds the "
            "libraries' log lines to the console; --helpfull lists them all."
        )
    )
    if full:
        lines += ["", "absl's flags:", flags.FLAGS.get_help(include_special_flags=False)]
    return "\n".join(lines)


def _flag_help(flag: flags.Flag) -> str:
    """`  --name: help` with the default and the choices, wrapped as absl wraps them."""
    text = flag.help  # an enum's help starts with its choices (absl adds them)
    if isinstance(flag.parser, flags.ListParser):
        text += " (a comma-separated list)"
    if flag.default not in (None, "", []) and not flag.boolean:
        text += f" (default: {flag.default_as_str})"
    elif flag.boolean:
        text += f" (default: {str(bool(flag.default)).lower()})"
    return flags.text_wrap(f"--{flag.name}: {text}", indent="      ", firstline_indent="  ")


def _print_help(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # `--help | head`: the reader left; so does the rest (as absl's usage does on EPIPE).
        sys.stdout = open(os.devnull, "w")


def usage_error(prog: str, message: str) -> SystemExit:
    """The exception a command line raises on a bad flag or argument: Python prints the
    message to stderr and exits with status 1 (as absl does for main's flags)."""
    return SystemExit(f"{prog}: error: {message}\nPass --help to see the flags.")


def parse(
    argv: Sequence[str] | None,
    doc: str,
    define_flags: DefineFlags,
    prog: str,
    known_only: bool = False,
) -> tuple[flags.FlagValues, list[str]]:
    """Parses a command line into a fresh `flags.FlagValues` holding `define_flags`'s flags.

    Args:
      argv: the arguments, program name excluded (None: `sys.argv[1:]`); `--flag value` and
        `--flag=value` both work, and positional arguments may sit between flags.
      doc: what `--help` prints above the flags (the module's docstring).
      define_flags: defines the command's flags on the instance it is given.
      prog: the command, for messages (`python -m puseg_jax.evaluate`).
      known_only: leave unknown `--flags` among the returned arguments (for commands that
        forward some, as `experiments` does `--config.*`) instead of refusing them.

    Returns:
      (the parsed flags, the positional arguments in order).

    Raises:
      SystemExit: 0 after printing the help when asked for; with a usage message (status 1)
        for an unknown flag, a bad value or a missing required flag.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    fv = flags.FlagValues()
    define_flags(fv)
    if wants_help(argv):
        _print_help(help_text(doc, fv, full="--helpfull" in argv))
        raise SystemExit(0)
    try:
        rest = fv([prog, *argv], known_only=known_only)
    except (flags.Error, ValueError) as e:
        raise usage_error(prog, str(e)) from None
    return fv, rest[1:]


def no_positional(args: Sequence[str], prog: str) -> None:
    """Refuses positional arguments (a command whose input is all flags)."""
    if args:
        raise usage_error(prog, f"unexpected arguments: {' '.join(args)}")


def verbose() -> bool:
    """Whether the libraries' log lines go to the console too: absl's `--verbosity` given on
    the command line (absl's default becomes INFO under `app.run`, which must not count), or
    `PUSEG_VERBOSE=1`."""
    return flags.FLAGS["verbosity"].present > 0 or logging_utils.verbose_from_env()


@contextlib.contextmanager
def console(workdir: str | None = None) -> Iterator[None]:
    """The console of every command line, as `python -m puseg_jax.main` has it.

    Args:
      workdir: a workdir the command writes into: everything printed and logged is appended to
        its `log.txt` too (`logging_utils.run_log`). None: no log file, the console only.

    The console shows the program's lines, warnings and errors; the libraries' INFO lines only
    when `verbose()`. Undone on exit, so a test or notebook may call a command's `main`.
    """
    if workdir is None:
        with logging_utils.quiet_console(verbose()):
            yield
    else:
        with logging_utils.run_log(workdir, verbose()):
            yield


def _absl_flags_only(argv: list[str]) -> list[str]:
    """`app.run`'s flags parser: absl's own flags into absl's `FLAGS`, the rest to `main`."""
    if wants_help(argv):
        # The command's `parse` prints its help (absl's would list none of its flags).
        flags.FLAGS.mark_as_parsed()
        return argv
    try:
        return flags.FLAGS(argv, known_only=True)
    except flags.Error as e:
        print(f"{argv[0]}: error: {e}\nPass --help to see the flags.", file=sys.stderr)
        sys.exit(1)


def run(main: Callable[[list[str]], Any], user_errors: tuple[type[Exception], ...] = ()) -> None:
    """`if __name__ == '__main__':` of a command line: absl's `app.run` (its log handler and
    flags, `--verbosity` included) around `main(argv)`.

    Args:
      main: the command's `main`, given the arguments absl left (program name excluded). An
        int it returns is the exit status; anything else (a summary, paths) means success.
      user_errors: exceptions that are the user's mistakes: their message, without a
        traceback, and exit status 1.
    """

    def _main(argv: list[str]) -> int:
        try:
            result = main(argv[1:])
        except user_errors as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return result if isinstance(result, int) else 0

    app.run(_main, flags_parser=_absl_flags_only)
