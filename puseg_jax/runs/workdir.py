"""Looking at a trained workdir: where the model is unsure, and whether that is where it is wrong.

The helpers of `notebooks/inspect_uncertainty.ipynb` and of `python -m puseg_jax.visualize`:
open a workdir (its `config.json` and the `eval/<name>/` reports evaluation wrote, or its
checkpoint when the predictions were not saved), pick cases, and draw figures. Every figure is
a `matplotlib.figure.Figure` made without pyplot, so nothing is shown or kept open behind the
caller's back: a notebook displays the returned figure, a script saves it (`save_figure`).
"""

import dataclasses
import os
from collections.abc import Sequence

import ml_collections
import numpy as np

from puseg_jax.core.datasets import DatasetInfo, get_dataset_info
from puseg_jax.core.formatting import number, to_float
from puseg_jax.core.paths import REPO_ROOT
from puseg_jax.evaluators import scoring
from puseg_jax.evaluators.records import PerCase, Predictions
from puseg_jax.runs.run_folder import RunFolder


@dataclasses.dataclass
class Workdir:
    """A trained run, as written by `trainer.train_and_evaluate`.

    Attributes:
      path: the workdir.
      config: the run's config (from `config.json`).
      info: the dataset family.
      evals: eval/<name>/summary.json of each evaluator, by name (sources first, then targets).
    """

    path: str
    config: ml_collections.ConfigDict
    info: DatasetInfo
    evals: dict[str, dict]

    @property
    def run(self) -> RunFolder:
        """The reader of the run's files."""
        return RunFolder(self.path)

    @property
    def method(self) -> str:
        return str(self.config.method)

    @property
    def eval_names(self) -> list[str]:
        return list(self.evals)

    def role(self, name: str) -> str:
        """'source_val' or 'target'."""
        return self.evals[name]["role"]

    def eval_dir(self, name: str) -> str:
        return self.run.eval_dir(name)


def default_workdir(env_var: str = "PUSEG_WORKDIR", method: str = "ours") -> str:
    """`$env_var` if set, else the demo's `workdirs/demo/<method>` (`./run.sh demo`), looked up
    in the current directory first, then in the repository."""
    if os.environ.get(env_var):
        return os.environ[env_var]
    local = os.path.join("workdirs", "demo", method)
    if os.path.isdir(local):
        return local
    return str(REPO_ROOT / "workdirs" / "demo" / method)


def load_config(workdir: str, announce: str = "") -> ml_collections.ConfigDict:
    """The config a workdir was trained with, completed with the defaults of fields added since
    (`RunFolder.load_config`; `announce` names them on the console)."""
    return RunFolder(workdir).load_config(announce)


def missing_predictions(workdir: str) -> list[str]:
    """Evaluators of a workdir whose `predictions.npz` (or report) is missing."""
    run = RunFolder(workdir)
    return [n for n in run.evaluator_names() if not run.has_reports(n)]


def reevaluate_workdir(workdir: str) -> None:
    """Evaluates the workdir's reported checkpoint on every evaluator with predictions saved
    (`trainer.evaluate_only`, i.e. `--mode=eval`): rewrites eval/ and summary.json."""
    from puseg_jax.train import trainer

    config = load_config(workdir)
    config.eval.save_predictions = True
    trainer.evaluate_only(config, workdir)


def open_workdir(workdir: str, evaluate_if_missing: bool = False) -> Workdir:
    """Opens a workdir for inspection.

    Args:
      workdir: a training workdir.
      evaluate_if_missing: when some evaluator lacks its saved predictions (a run with
        `eval.save_predictions=False`, or one stopped before its final evaluation), evaluate the
        checkpoint first (needs JAX and the data); otherwise raise.

    Returns:
      The `Workdir`.
    """
    run = RunFolder(workdir)
    config = run.config
    missing = missing_predictions(workdir)
    if missing and evaluate_if_missing:
        print(f"[inspect] {workdir}: no saved predictions for {missing}; evaluating the checkpoint")
        reevaluate_workdir(workdir)
        missing = missing_predictions(workdir)
    if missing:
        raise FileNotFoundError(
            f"{workdir}: eval/<name>/ reports (predictions, per-case table) missing for "
            f"{missing}; pass evaluate_if_missing=True (command line: --evaluate_if_missing) to "
            "evaluate the checkpoint"
        )
    evals = {name: run.eval_summary(name) for name in run.evaluator_names()}
    order = sorted(evals, key=lambda n: evals[n]["role"] != "source_val")  # stable
    evals = {n: evals[n] for n in order}
    return Workdir(workdir, config, get_dataset_info(config.data.name), evals)


def default_domain(wd: Workdir) -> str:
    """`$PUSEG_DOMAIN` if set, else the first target domain (the unseen scanner), else the first
    evaluator."""
    name = os.environ.get("PUSEG_DOMAIN")
    if name:
        if name not in wd.evals:
            raise ValueError(f"PUSEG_DOMAIN={name!r}: not one of {wd.eval_names}")
        return name
    targets = [n for n in wd.evals if wd.role(n) == "target"]
    return (targets or wd.eval_names)[0]


def load_predictions(wd: Workdir, name: str) -> Predictions:
    """An evaluator's saved predictions (`RunFolder.predictions`).

    The file stores float16; arrays come back as float32. Masks recomputed from them can differ
    from the scored ones on pixels within float16 rounding of the threshold; the Dice shown
    everywhere is the scored one (per_case.csv).
    """
    return wd.run.predictions(name)


def load_all_predictions(wd: Workdir) -> dict[str, Predictions]:
    """`load_predictions` of every evaluator, by name."""
    return {n: load_predictions(wd, n) for n in wd.eval_names}


def load_per_case(wd: Workdir, name: str) -> PerCase:
    """per_case.csv as {case_id: {structure: {dice, hd95, asd, empty_pred, empty_gt}}}
    (`RunFolder.per_case`)."""
    return wd.run.per_case(name)


def mean_case_dice(per_case: PerCase) -> dict[str, float]:
    """Mean Dice over structures, per case."""
    return {c: float(np.mean([s["dice"] for s in row.values()])) for c, row in per_case.items()}


def case_uncertainty(pred: Predictions, info: DatasetInfo) -> dict[str, float]:
    """Mean pixel uncertainty of each case (all its pixels, all its slices).

    Inputs are the network's fixed size, so this is the uncertain area of a case in units of
    the image: a case-level flag that needs no label.
    """
    return {
        c: float(pred.uncertainty[idx].mean())
        for c, idx in scoring.group_cases(pred, info.volumetric)
    }


def select_cases(
    pred: Predictions,
    per_case: PerCase,
    info: DatasetInfo,
    num: int,
    order: str = "first",
) -> list[tuple[str, np.ndarray]]:
    """Picks cases to show.

    Args:
      pred: an evaluator's predictions (`load_predictions`).
      per_case: its per-case metrics (`load_per_case`).
      info: the dataset family.
      num: how many.
      order: 'first' (the split's order, as panels and TensorBoard), 'worst' / 'best' (mean Dice
        over structures), 'most_uncertain' (`case_uncertainty`).

    Returns:
      (case_id, example indices in slice order), as `scoring.group_cases`.
    """
    cases = scoring.group_cases(pred, info.volumetric)
    if order == "first":
        return cases[:num]
    if order in ("worst", "best"):
        dice = mean_case_dice(per_case)
        ranked = sorted(cases, key=lambda c: dice[c[0]], reverse=order == "best")
    elif order == "most_uncertain":
        u = case_uncertainty(pred, info)
        ranked = sorted(cases, key=lambda c: -u[c[0]])
    else:
        raise ValueError(f"Unknown order {order!r}: first | worst | best | most_uncertain")
    return ranked[:num]


def uncertainty_table(wds: Workdir | Sequence[Workdir]) -> str:
    """Markdown table of the uncertainty metrics of every evaluator of one or more workdirs,
    with the mean Dice over structures."""
    wds = [wds] if isinstance(wds, Workdir) else list(wds)
    keys = ("ece", "brier", "nll", "auroc_error", "u_boundary", "u_interior", "u_boundary_ratio")
    lines = [
        "| method | domain | role | mean Dice | " + " | ".join(keys) + " |",
        "|" + "---|" * (4 + len(keys)),
    ]
    for wd in wds:
        for name, ev in wd.evals.items():
            dice = np.mean([to_float(sm["dice"]["mean"]) for sm in ev["structures"].values()])
            unc = ev.get("uncertainty", {})
            cells = " | ".join(number(to_float(unc.get(k)), ".4f") for k in keys)
            row = [wd.method, name, ev["role"], number(dice, ".4f"), cells]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
