"""What a run prints: the program's own lines on the console, everything in WORKDIR/log.txt."""

import io
import logging
import os
import re
import subprocess
import sys

import pytest

from tests import conftest
from tests.train_worker import RUN_STEPS, SMALL_MODEL, shared_jax_cache, worker_env

# absl's log line prefix: level letter, MMDD, time, thread, file:line]
ABSL_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [^ ]+:\d+\] ")


def _record(level: int, pathname: str) -> logging.LogRecord:
    return logging.LogRecord("absl", level, pathname, 1, "message", None, None)


def test_quiet_console_shows_warnings_and_errors_but_not_info_or_library_routine():
    from puseg_jax.core import logging_utils

    def lib(*parts):
        return os.path.join(os.sep, "venv", "site-packages", *parts)

    tfds_file = lib("tensorflow_datasets", "core", "dataset_builder.py")
    orbax_file = lib("orbax", "checkpoint", "checkpoint_manager.py")
    jax_file = lib("jax", "_src", "xla_bridge.py")
    ours = str(conftest.REPO / "puseg_jax" / "evaluators" / "scoring.py")
    for path in (ours, orbax_file, jax_file):
        assert not logging_utils._quiet_console(_record(logging.INFO, path))
    for path in (ours, jax_file):
        assert logging_utils._quiet_console(_record(logging.WARNING, path))
    for path in (tfds_file, orbax_file):
        assert not logging_utils._quiet_console(_record(logging.WARNING, path))
        assert logging_utils._quiet_console(_record(logging.ERROR, path))


def test_stdout_to_log_turns_prints_into_info_records(caplog, capsys):
    from puseg_jax.core import logging_utils

    with caplog.at_level(logging.INFO), logging_utils.stdout_to_log():
        print("first line\n")
        print("second", end="")
    assert capsys.readouterr().out == ""
    assert [r.getMessage() for r in caplog.records] == ["first line", "second"]


def test_progress_updates_in_place_on_a_terminal_and_logs_plain_lines(monkeypatch, capsys):
    from puseg_jax.core import logging_utils

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    console, log = Terminal(), io.StringIO()
    run = logging_utils._RunLog(log, console)
    monkeypatch.setattr(logging_utils, "_ACTIVE", run)
    out = logging_utils._Tee(console, run)
    logging_utils.progress("[train] step 1/4")
    logging_utils.progress("[train] step 2/4")
    out.write("[eval] step 2\n")
    assert console.getvalue() == (
        "\r[train] step 1/4\x1b[K\r[train] step 2/4\x1b[K\n[eval] step 2\n"
    )
    assert log.getvalue() == "[train] step 1/4\n[train] step 2/4\n[eval] step 2\n"
    # Not a terminal (a pipe, a file): plain lines at the log cadence.
    monkeypatch.setattr(logging_utils, "_ACTIVE", None)
    logging_utils.progress("[train] step 3/4")
    assert capsys.readouterr().out == "[train] step 3/4\n"


def test_run_log_is_undone_after_its_block_and_keeps_the_failure(tmp_path, capsys):
    from absl import logging as absl_logging

    from puseg_jax.core import logging_utils

    streams, handlers = (sys.stdout, sys.stderr), list(logging.getLogger().handlers)
    absl_filters = list(absl_logging.get_absl_handler().filters)
    with logging_utils.run_log(str(tmp_path), verbose=False):
        print("[eval] inside")
        logging.getLogger("some.library").warning("a library warning")
        assert absl_logging.get_absl_handler().filters == [
            *absl_filters,
            logging_utils._quiet_console,
        ]
        try:
            with logging_utils.run_log(str(tmp_path / "inner"), verbose=True):
                raise ValueError("boom")
        except ValueError:
            pass
    print("[eval] after")
    assert (sys.stdout, sys.stderr) == streams
    assert logging.getLogger().handlers == handlers
    assert absl_logging.get_absl_handler().filters == absl_filters
    assert logging_utils._ACTIVE is None
    assert capsys.readouterr().out == "[eval] inside\n[eval] after\n"
    log = (tmp_path / "log.txt").read_text()
    assert "[eval] inside" in log and "a library warning" in log and "after" not in log
    inner = (tmp_path / "inner" / "log.txt").read_text()
    assert inner.rstrip().endswith("ValueError: boom") and "Traceback" in inner


def test_main_prints_only_its_own_lines_and_logs_everything(tfds_dir, tmp_path_factory):
    # The resume test's run (same programs, so the shared compilation cache serves both), with
    # evaluation every 12 of its 24 steps: the periodic evaluation at step 24 falls on the last
    # step, where the final evaluation scores the same state, and is printed once.
    workdir = tmp_path_factory.mktemp("console") / "run"
    env = worker_env(8, shared_jax_cache(tmp_path_factory))
    env.pop("PUSEG_VERBOSE", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "puseg_jax.main",
            "--config=configs/test.py",
            f"--workdir={workdir}",
            f"--config.data.data_dir={tfds_dir}",
            f"--config.num_train_steps={RUN_STEPS}",
            "--config.log_every_steps=12",
            "--config.checkpoint_every_steps=8",
            "--config.eval_every_steps=12",
            *[f"--config.{k}={v!r}" for k, v in SMALL_MODEL.items()],
        ],
        cwd=conftest.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    console = (result.stdout + result.stderr).splitlines()
    assert not [line for line in console if ABSL_LINE.match(line)]
    assert not [line for line in console if "Shuffling" in line or "Generating" in line]
    assert all(
        line.startswith(("[prepare]", "[train]", "[eval]", "[timing]", "|"))
        for line in console
        if line
    ), console
    # The run's last line: where its time went (timing.json has the same).
    timing = [line for line in console if line.startswith("[timing]")]
    assert len(timing) == 1 and "train steps" in timing[0]
    assert result.stdout.strip().splitlines()[-1] == timing[0]
    steps = [line.split()[2] for line in console if line.startswith("[train] step")]
    assert steps == ["12/24", "24/24"]
    # Step 12: one line for the source domains (each evaluator's own line is in the log).
    periodic = [line for line in console if line.startswith("[eval] step 12 ")]
    assert len(periodic) == 1 and re.match(
        r"\[eval\] step 12 source_val Dice: Domain1 OD [0-9.]+ OC [0-9.]+ \| Domain2 .* \| mean ",
        periodic[0],
    )
    for name in ("Domain1", "Domain2", "Domain3"):
        assert sum(line.startswith(f"[eval] step 24 {name} ") for line in console) == 1
    assert sum(line.startswith("| ours | Domain3 | target |") for line in console) == 1

    log = (workdir / "log.txt").read_text()
    assert sum(bool(ABSL_LINE.match(line)) for line in log.splitlines()) > 10
    assert "[eval] step 12 Domain1 (source_val" in log
    # clu's parameter table: in log.txt only, once, with the model's total.
    assert log.count("[train] parameters of the ours model:") == 1
    assert re.search(r"^\| \S+/kernel +\| +\(3, 3, 3, \d+\) +\|", log, re.MULTILINE)
    assert re.search(r"^Total: [\d,]+ -- [\d,]+ bytes$", log, re.MULTILINE)
    assert not [line for line in console if "parameters of the" in line]
    for line in console:
        assert line in log  # the console's lines too, in the same words


# The first line of each command line's --help (its docstring) and what it must name: what the
# command writes, and where.
CLI_HELP = {
    "main": ("Trains a model (then evaluates it)", ("log.txt", "summary.json", "checkpoints")),
    "evaluate": ("Runs a trained model on a hospital", ("W/eval/NAME", "review.csv")),
    "visualize": ("Draws PNG panels and figures", ("DIR/<domain>/", "contact_sheet.png")),
    "experiments": ("Runs a leave-one-domain-out suite", ("results.md", "run.json")),
    "report": ("Prints the results of finished runs", ("writes nothing", "summary.json")),
}


def _python_m(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"puseg_jax.{module}", *args],
        cwd=conftest.REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("module", sorted(CLI_HELP))
def test_every_command_line_has_help_and_refuses_a_bad_flag(module):
    first_line, written = CLI_HELP[module]
    result = _python_m(module, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    head = result.stdout.splitlines()[0]
    assert head.startswith(first_line) and f"`python -m puseg_jax.{module}`" in head
    for name in written:
        assert name in result.stdout, name
    assert "\nflags:\n" in result.stdout and "--verbosity=0" in result.stdout
    # absl's own flags pass through to absl; an unknown one is a usage error naming it.
    result = _python_m(module, "--verbosity=1", "--no_such_flag=3")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"python -m puseg_jax.{module}: error: Unknown command line flag 'no_such_flag'",
        "Pass --help to see the flags.",
    ]


def test_importing_the_command_lines_installs_no_log_handler():
    # A library logging while a command line module is imported (orbax and grain do, on their
    # own import) makes Python install its default stderr handler on the root logger, which
    # would print every INFO line beside absl's handler once `app.run` starts.
    script = (
        "import logging\n"
        "from puseg_jax import evaluate, experiments, main, report, visualize\n"
        "assert not logging.root.handlers, logging.root.handlers\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=conftest.REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
