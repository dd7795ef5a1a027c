"""A trained model on a hospital it never saw: `python -m puseg_jax.evaluate`.

    python -m puseg_jax.evaluate --workdir W --data DIR [--name NAME]

builds DIR as a test-only domain of W's dataset family (its `config.json`), predicts every case
with W's reported checkpoint (the one its `summary.json` names: the last, or the best on source
validation) and writes `W/eval/NAME/` (NAME defaults to DIR's folder name) like a target
domain's report, with role 'external':

* `summary.json`, `per_case.csv`, `predictions.npz`, `panel_*.png` and TensorBoard events
  (`tb/`) as `reports.write_domain_reports` writes them for a target. With labels the cases
  are scored exactly as a target evaluator scores them (`scoring.score_split`: on the grid of
  the run's `eval.resolution`, native by default, with its 'resolution', 'distance' and
  'uncertainty_resolution' fields). Without labels nothing is scored (the summary says so) and
  the panels show image, prediction and uncertainty;
* `review.csv`: the cases ranked by a quality-control score, most doubtful first (`quality.py`),
  with the predicted size and, with labels, the Dice;
* `predictions/`: the predictions in the user's own formats, on the original grid: for NIfTI
  volumes `<case>_pred.nii.gz` (labels) and `<case>_uncertainty.nii.gz` (float32 in [0, 1]),
  with the input's affine and shape; for fundus images `<case>_pred.png` in the release's
  convention (0 cup, 128 disc rim, 255 background) and `<case>_uncertainty.png` (8-bit, U * 255),
  of the image's size. They are the native probabilities native scoring thresholds
  (`scoring.native_probs`), post-processed as the scores are: with labels and native
  scoring, a written mask scores what per_case.csv says.

Layouts of DIR:

* fundus families (`fundus`, `synth_fundus`): DoFE's `DIR/test/ROIs/{image,mask}/` (a domain
  folder without `train/`), or a flat `DIR/image/` + `DIR/mask/`; without the `mask` folder the
  images are predicted unlabelled. Masks use the 0/128/255 convention. The training's centre crop
  (512 for the real fundus family) is applied, and the region outside it is written as
  background with uncertainty 0 (it was not predicted).
* prostate families (`prostate`, `prostate_slices`, `synth_prostate`): a folder of NIfTI volumes,
  SAML naming (`Case00.nii.gz` + `Case00_segmentation.nii.gz`), all with labels or none.

Everything is written into a hidden folder beside the result (`W/eval/.partial-NAME-*`) and
renamed to `W/eval/NAME` at the end: a failure leaves nothing half-written. The console shows
the `[prepare]` and `[eval]` lines; every log line goes to `W/log.txt`
(`logging_utils.setup_run_log`, `--verbose` or `PUSEG_VERBOSE=1` for all of it on the console).

Only `main` knows about flags; `evaluate_external` is the function.
"""

import argparse
import logging as pylogging
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags as absl_flags
from absl import logging

from puseg_jax.core import logging_utils
from puseg_jax.evaluators import quality
from puseg_jax.external.folders import LABELS
from puseg_jax.external.pipeline import evaluate_external

# ---------------------------------------------------------------------------------------------
# Command line.


def parse_fail_dice(text: str) -> float | dict[str, float]:
    """'0.9' -> 0.9; 'OD=0.9,OC=0.8' -> {'OD': 0.9, 'OC': 0.8}."""
    try:
        if "=" not in text:
            return float(text)
        out = {}
        for part in text.split(","):
            key, value = part.split("=")
            out[key.strip()] = float(value)
        return out
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"--fail_dice {text!r}: expected a number (0.9) or STRUCTURE=VALUE pairs "
            "(OD=0.9,OC=0.8)"
        ) from e


def parse_center_crop(text: str) -> int | None | str:
    """'train' | 'none' | a positive int."""
    if text in ("train", "none"):
        return None if text == "none" else text
    try:
        return int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--center_crop {text!r}: train, none or an int") from e


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line's flags: `evaluate_external`'s arguments, and `verbose`.

    Args:
      argv: command-line arguments (None: sys.argv[1:]).
    """
    parser = argparse.ArgumentParser(
        prog="python -m puseg_jax.evaluate",
        description="Runs a trained workdir's reported checkpoint on a folder of your own (a "
        "hospital the model never saw) and writes W/eval/NAME: scores when there are labels, "
        "predictions and uncertainty maps in your formats on your grid, and review.csv (cases "
        "ranked by a quality-control score, most doubtful first).",
    )
    parser.add_argument("--workdir", required=True, help="a finished training workdir")
    parser.add_argument(
        "--data",
        required=True,
        help="fundus: DIR/test/ROIs/{image,mask} or DIR/{image,mask} (mask optional); "
        "prostate: DIR/<case>.nii.gz [+ <case>_segmentation.nii.gz]",
    )
    parser.add_argument("--name", default=None, help="report name (default: DIR's name)")
    parser.add_argument(
        "--labels",
        default="auto",
        choices=LABELS,
        help="auto: score when masks are there; yes: masks required; no: ignore masks",
    )
    parser.add_argument(
        "--fail_dice",
        type=parse_fail_dice,
        default=quality.DEFAULT_FAIL_DICE,
        help="a case fails below this Dice: 0.9, or per structure OD=0.9,OC=0.8 (default 0.9)",
    )
    parser.add_argument(
        "--qc_score",
        default="auto",
        choices=("auto",) + quality.QC_SCORES,
        help="auto: the score that best finds failures on the run's source validation",
    )
    parser.add_argument(
        "--center_crop",
        type=parse_center_crop,
        default="train",
        help="fundus: train (the crop the model saw), none (whole images) or a side in pixels",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier eval/NAME of this command"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help=f"library log lines on the console too (also {logging_utils.VERBOSE_ENV}=1); "
        f"they are always in W/{logging_utils.LOG_FILE}",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`python -m puseg_jax.evaluate`: flags -> the run's log -> `evaluate_external`.

    Args:
      argv: command-line arguments (None: sys.argv[1:]).

    Returns:
      The written summary.
    """
    args = vars(parse_args(argv))
    verbose = args.pop("verbose") or logging_utils.verbose_from_env()
    # The workdir's log.txt, as a training run's: only in a training workdir, so that a mistyped
    # --workdir stops with its message without becoming a folder.
    if os.path.isfile(os.path.join(args["workdir"], "config.json")):
        # The console as `python -m puseg_jax.main` has it (app.run there): absl's handler on
        # the root logger, its flags at their defaults (this command line is argparse's), INFO
        # to log.txt. A library that logged while this module was imported made absl install
        # `logging.basicConfig`'s stderr handler, which would print every INFO line: removed.
        absl_flags.FLAGS.mark_as_parsed()
        for handler in list(pylogging.root.handlers):
            if type(handler) is pylogging.StreamHandler:
                pylogging.root.removeHandler(handler)
        logging.use_absl_handler()
        logging_utils.setup_run_log(args["workdir"], verbose)
        logging.set_verbosity(logging.INFO)
    return evaluate_external(**args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # The user's mistakes (DataError is a ValueError): the message, not a traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
