"""`RunFolder`: the one reader of a run's folder (what `trainer.train_and_evaluate` and
`python -m puseg_jax.evaluate` write, docs/architecture.md "What a run writes").

The notebook helpers (`runs.workdir`), the suite tables and statistics (`runs.tables`,
`runs.stats`), the external evaluation (`external`) and the command lines read a run through it;
the formats of the files are `evaluators.records`'.
"""

import functools
import json
import os
from pathlib import Path
from typing import Any

import ml_collections

from puseg_jax.core import config_diff
from puseg_jax.evaluators import records
from puseg_jax.evaluators.records import PerCase, Predictions

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"  # written by core.logging_utils.MetricWriter


class RunFolder:
    """A run's folder: `config.json`, `summary.json`, `checkpoints/{last,best}` and per evaluator
    `eval/<name>/{summary.json, per_case.csv, predictions.npz}`.

    Nothing is read until asked for; the config is read once.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)

    def __repr__(self) -> str:
        return f"RunFolder({self.path!r})"

    # ---- the run ----------------------------------------------------------------------------

    def load_config(self, announce: str = "") -> ml_collections.ConfigDict:
        """The config the run was trained with, completed with the defaults of fields added
        since (`config_diff.with_defaults`: a field is added with the old behaviour as its
        default, so a run older than some fields computed what their defaults compute).

        Args:
          announce: a console prefix such as '[eval]': when set, the fields the run predates
            are named on the console.

        Raises:
          FileNotFoundError: not a training workdir.
        """
        path = os.path.join(self.path, CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: is {self.path!r} a training workdir? (python -m "
                "puseg_jax.main writes config.json there; `./run.sh demo` writes "
                "workdirs/demo/erm and workdirs/demo/ours)"
            )
        completed, added = config_diff.with_defaults(records.read_json(path))
        if added and announce:
            print(
                f"{announce} {path} predates {len(added)} config field(s), taken at their "
                "defaults: " + ", ".join(added),
                flush=True,
            )
        return ml_collections.ConfigDict(completed)

    def has_config(self) -> bool:
        """Whether this is a training workdir (config.json exists)."""
        return os.path.isfile(os.path.join(self.path, CONFIG_FILE))

    @functools.cached_property
    def config(self) -> ml_collections.ConfigDict:
        """`load_config()`, read once."""
        return self.load_config()

    def summary_path(self) -> str:
        return os.path.join(self.path, records.SUMMARY_FILE)

    def has_summary(self) -> bool:
        """Whether the run finished its final evaluation (summary.json exists)."""
        return os.path.isfile(self.summary_path())

    def summary(self) -> dict[str, Any]:
        """The run's summary.json (`reports.make_summary`)."""
        return records.read_json(self.summary_path())

    def reported_checkpoint(self) -> tuple[str, int, str]:
        """The checkpoint the finished run reported: (its folder 'last' | 'best', step, its label
        as summary.json writes it, 'last' or 'best@<step>').

        Raises:
          FileNotFoundError: no summary.json (the run has not finished its final evaluation, or
            this is not a workdir), or no checkpoint at that step.
          ValueError: a label summary.json should not hold.
        """
        path = self.summary_path()
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: the run in {self.path} has not finished (its summary names "
                "the checkpoint it reports). Finish or resume the training, or write the summary "
                "with `python -m puseg_jax.main --config ... --workdir W --mode=eval`."
            )
        summary = self.summary()
        label, step = str(summary.get("checkpoint", "")), summary.get("step")
        if label == "last":
            which = "last"
        elif label.startswith("best@"):
            which, step = "best", int(label.split("@", 1)[1])
        else:
            raise ValueError(f"{path}: unknown checkpoint {label!r} (expected 'last' or 'best@N')")
        steps = self.checkpoint_steps(which)
        if step is None or int(step) not in steps:
            raise FileNotFoundError(
                f"{self.path}: summary.json reports checkpoint {label!r} at step {step}, but "
                f"{self.checkpoint_dir(which)} holds steps {steps}"
            )
        return which, int(step), label

    def checkpoint_dir(self, which: str) -> str:
        return os.path.join(self.path, "checkpoints", which)

    def checkpoint_steps(self, which: str = "last") -> list[int]:
        """The steps saved under checkpoints/<which>, in order."""
        folder = self.checkpoint_dir(which)
        if not os.path.isdir(folder):
            return []
        return sorted(int(d) for d in os.listdir(folder) if d.isdigit())

    # ---- evaluators -------------------------------------------------------------------------

    def evaluator_names(self) -> list[str]:
        """The run's evaluators (`config.evals`, or those the config implies), in order."""
        from puseg_jax.train import config as train_config

        return list(train_config.resolve_evals(self.config))

    def eval_dir(self, name: str) -> str:
        """eval/<name>/: an evaluator's reports."""
        return os.path.join(self.path, "eval", name)

    def has_reports(self, name: str) -> bool:
        """Whether the evaluator has summary.json, per_case.csv and predictions.npz."""
        return records.has_reports(self.eval_dir(name))

    def has_per_case(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.eval_dir(name), records.PER_CASE_FILE))

    def has_predictions(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.eval_dir(name), records.PREDICTIONS_FILE))

    def eval_summary(self, name: str) -> dict[str, Any]:
        """eval/<name>/summary.json (`scoring.score_split`'s result, as written)."""
        return records.read_json(os.path.join(self.eval_dir(name), records.SUMMARY_FILE))

    def per_case(self, name: str) -> PerCase:
        """eval/<name>/per_case.csv (`records.read_per_case`)."""
        return records.read_per_case(os.path.join(self.eval_dir(name), records.PER_CASE_FILE))

    def metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl: one dict per written step ('step' and its scalars), in file order."""
        with open(os.path.join(self.path, METRICS_FILE)) as f:
            return [json.loads(line) for line in f if line.strip()]

    def predictions(self, name: str) -> Predictions:
        """eval/<name>/predictions.npz (`records.Predictions.load`: float16 fields as float32)."""
        return Predictions.load(os.path.join(self.eval_dir(name), records.PREDICTIONS_FILE))


def open_run(path: str | os.PathLike | RunFolder) -> RunFolder:
    """A `RunFolder` of a path (or the folder itself)."""
    return path if isinstance(path, RunFolder) else RunFolder(Path(path))
