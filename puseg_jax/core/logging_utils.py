"""What a run writes besides checkpoints: the console, `<workdir>/log.txt`, and the metrics
(JSON lines and TensorBoard through tensorboardX, no TensorFlow, process 0 only).

The console shows what a user needs: the program's own `[prepare]`, `[train]` and `[eval]`
lines, the tables, and warnings and errors. What libraries log at INFO (absl, TFDS, orbax,
grain: hundreds of lines per run) goes to `log.txt` only, which holds the console's lines as
well; `--verbosity=0` or `1` (absl's flag) or `PUSEG_VERBOSE=1` shows it all
on the console too (`setup_run_log`).
"""

import contextlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from absl import logging as absl_logging

LOG_FILE = "log.txt"
VERBOSE_ENV = "PUSEG_VERBOSE"
# Warnings of the data and checkpoint libraries are routine in every run (TFDS: the builder
# config variants and image decoder it picks; orbax: a save that waited for the previous one):
# log.txt keeps them, the console shows their errors only. JAX's own warnings (e.g. a GPU
# backend that failed to start) and the project's reach the console.
_CONSOLE_MUTED_WARNINGS = tuple(
    f"{os.sep}{package}{os.sep}" for package in ("tensorflow_datasets", "orbax", "grain")
)


def verbose_from_env() -> bool:
    """Whether `PUSEG_VERBOSE` asks for every log line on the console."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


class _RunLog:
    """The active run's log file and console state."""

    def __init__(self, file, console):
        self.file = file
        self.console = console  # the real stdout
        # A progress line was written in place on the terminal and not ended yet.
        self.open_line = False

    def end_open_line(self) -> None:
        if self.open_line:
            self.console.write("\n")
            self.open_line = False


_ACTIVE: _RunLog | None = None
_PROGRESS_BARS = True  # whether libraries may draw progress bars (TFDS's while building)


class _Tee:
    """sys.stdout / sys.stderr of a run: writes go to the console and to log.txt."""

    def __init__(self, stream, run: _RunLog):
        self._stream = stream
        self._run = run

    def write(self, text: str) -> int:
        if text:
            self._run.end_open_line()
            self._stream.write(text)
            self._run.file.write(text)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()
        self._run.file.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ... of the console
        return getattr(self._stream, name)


def _quiet_console(record: logging.LogRecord) -> bool:
    """Console filter of the default output: warnings and errors, less the data and
    checkpoint libraries' routine warnings (log.txt keeps every record)."""
    if record.levelno >= logging.ERROR:
        return True
    if record.levelno < logging.WARNING:
        return False
    return not any(part in record.pathname for part in _CONSOLE_MUTED_WARNINGS)


def _same_file(stream, path: str) -> bool:
    try:
        a, b = os.fstat(stream.fileno()), os.stat(path)
    except (AttributeError, OSError, ValueError):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def setup_run_log(workdir: str, verbose: bool) -> Callable[[], None]:
    """Sends everything a run prints and logs to `<workdir>/log.txt` (appended), and keeps the
    console to the program's own lines unless `verbose`.

    Called by the command lines (`core.cli.console`), after absl has parsed the flags and
    installed its log handler; tests and notebooks that call `trainer.train_and_evaluate`
    directly keep Python's defaults. When stdout already is that log.txt (`./run.sh experiments`
    redirects each run's output there), the output is the log: it is left alone, unfiltered, so
    each line is written once.

    Args:
      workdir: the run's workdir (created if missing).
      verbose: show library INFO lines and TFDS progress bars on the console too.

    Returns:
      A function that undoes it all (console, handlers, log file), for `run_log`.
    """
    global _ACTIVE, _PROGRESS_BARS
    previous = (_ACTIVE, _PROGRESS_BARS)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOG_FILE)
    file = open(path, "a", buffering=1, encoding="utf-8")  # line-buffered: readable while running
    if _same_file(sys.stdout, path):
        file.close()
        _PROGRESS_BARS = False  # redrawn bars are noise in a file

        def undo_progress_bars() -> None:
            global _PROGRESS_BARS
            _PROGRESS_BARS = previous[1]

        return undo_progress_bars
    _PROGRESS_BARS = verbose
    file.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
    run = _RunLog(file, sys.stdout)
    streams = (sys.stdout, sys.stderr)
    sys.stdout = _Tee(sys.stdout, run)
    sys.stderr = _Tee(sys.stderr, run)
    handler = logging.StreamHandler(file)
    handler.setFormatter(absl_logging.PythonFormatter())
    logging.getLogger().addHandler(handler)
    undo_filter = _add_console_filter(verbose)
    _ACTIVE = run

    def undo() -> None:
        global _ACTIVE, _PROGRESS_BARS
        run.end_open_line()
        undo_filter()
        logging.getLogger().removeHandler(handler)
        sys.stdout, sys.stderr = streams
        file.close()
        _ACTIVE, _PROGRESS_BARS = previous

    return undo


def _add_console_filter(verbose: bool) -> Callable[[], None]:
    """Keeps absl's console handler to warnings and errors unless `verbose`; returns the undo."""
    if verbose:
        return lambda: None
    handler = absl_logging.get_absl_handler()
    handler.addFilter(_quiet_console)
    return lambda: handler.removeFilter(_quiet_console)


@contextlib.contextmanager
def run_log(workdir: str, verbose: bool) -> Iterator[None]:
    """`setup_run_log` for the duration of a block, undone after it (a command line's `main`
    called by a test or a notebook leaves the process as it found it)."""
    undo = setup_run_log(workdir, verbose)
    try:
        yield
    except BaseException as e:
        # The console gets the failure from whoever handles it, after the block; the log keeps
        # it too, as it did when the run log lasted until the process ended.
        if _ACTIVE is not None and not (isinstance(e, SystemExit) and not e.code):
            _ACTIVE.file.write("".join(traceback.format_exception(e)))
        raise
    finally:
        undo()


@contextlib.contextmanager
def quiet_console(verbose: bool) -> Iterator[None]:
    """The console of a command that writes no log.txt: the program's lines, warnings and
    errors; the libraries' INFO lines only when `verbose` (as `setup_run_log` has it)."""
    undo = _add_console_filter(verbose)
    try:
        yield
    finally:
        undo()


def progress_bars() -> bool:
    """Whether libraries may draw progress bars: by default only in verbose runs (and where no
    run log is set up, as the libraries do)."""
    return _PROGRESS_BARS


def progress(text: str) -> None:
    """A progress line. On a terminal it replaces the previous one in place; in a pipe or a
    file (and always in log.txt) it is a plain line."""
    run = _ACTIVE
    if run is None or not run.console.isatty():
        print(text, flush=True)
        return
    run.console.write("\r" + text + "\x1b[K")
    run.console.flush()
    run.file.write(text + "\n")
    run.open_line = True


class _LogLines:
    """A stdout that turns each printed line into an INFO log record."""

    def __init__(self):
        self._buffer = ""

    def write(self, text: str) -> int:
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            if line.strip():
                absl_logging.info("%s", line.rstrip())
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        self.write("\n")


@contextlib.contextmanager
def stdout_to_log():
    """Inside, what is printed goes to the log at INFO (log.txt; the console when verbose)."""
    lines = _LogLines()
    try:
        with contextlib.redirect_stdout(lines):
            yield
    finally:
        lines.close()


class MetricWriter:
    """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard events in `<workdir>/tb`.

    Every process may call it; only process 0 writes.
    """

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        self._tb = None
        self._jsonl = None
        if self.active:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def scalars(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.active:
            return
        clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
        for k, v in clean.items():
            self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """image: [H, W, 3] float in [0, 1] or uint8."""
        if self.active:
            self._tb.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def histogram(self, step: int, tag: str, values: np.ndarray) -> None:
        if self.active:
            self._tb.add_histogram(tag, np.asarray(values).ravel(), step)

    def close(self) -> None:
        if self.active:
            self._tb.close()
            self._jsonl.close()
