"""Runs a trained model on a hospital it never saw: `python -m puseg_jax.evaluate`.

    python -m puseg_jax.evaluate --workdir W --data DIR [--name NAME] [--labels auto|yes|no]
        [--fail_dice 0.9] [--qc_score auto] [--center_crop train] [--framing auto] [--overwrite]

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
* whole fundus photographs (`DIR/image/` + optional `DIR/mask/`, masks at the photograph's
  size): whether an image is a whole photograph or a disc-centred region is decided per image
  (the black surround of a photograph's field of view: 3 or 4 dark corners) and printed;
  `--framing=photo|region` overrides. In a photograph the disc is located with the run's own
  model (`external.localise`), the region at the framing of the run's training masks is
  predicted and pasted back onto the photograph's grid, and the scores, `<case>_pred.png` and
  `<case>_uncertainty.png` are on the whole photograph. review.csv gains the localisation
  (`loc_*` columns) and ranks doubtful localisations (no disc, two candidates, at the edge)
  first; the panels show the located region on the photograph beside its close-up. A photograph
  that cannot be used (unreadable, grey, smaller than the network input, a mask of another size,
  no disc found) is skipped with one line and listed in summary.json; the others go on.
* prostate families (`prostate`, `prostate_slices`, `synth_prostate`): a folder of NIfTI volumes,
  SAML naming (`Case00.nii.gz` + `Case00_segmentation.nii.gz`), all with labels or none.

Everything is written into a hidden folder beside the result (`W/eval/.partial-NAME-*`) and
renamed to `W/eval/NAME` at the end: a failure leaves nothing half-written. The console shows
the `[prepare]` and `[eval]` lines; every log line goes to `W/log.txt` as well (`--verbosity=0`
or `PUSEG_VERBOSE=1` for all of it on the console).

Only `main` knows about flags; `external.pipeline.evaluate_external` is the function.
"""

from collections.abc import Sequence
from typing import Any

from absl import flags

from puseg_jax.core import cli
from puseg_jax.evaluators import quality
from puseg_jax.external.folders import LABELS

PROG = "python -m puseg_jax.evaluate"

# ---------------------------------------------------------------------------------------------
# Command line.


def parse_fail_dice(text: str | float) -> float | dict[str, float]:
    """'0.9' -> 0.9; 'OD=0.9,OC=0.8' -> {'OD': 0.9, 'OC': 0.8}."""
    if isinstance(text, int | float):
        return float(text)
    try:
        if "=" not in text:
            return float(text)
        out = {}
        for part in text.split(","):
            key, value = part.split("=")
            out[key.strip()] = float(value)
        return out
    except ValueError as e:
        raise ValueError(
            f"{text!r}: expected a number (0.9) or STRUCTURE=VALUE pairs (OD=0.9,OC=0.8)"
        ) from e


def parse_center_crop(text: str | int | None) -> int | None | str:
    """'train' | 'none' | a positive int."""
    if text is None or isinstance(text, int):
        return text
    if text in ("train", "none"):
        return None if text == "none" else text
    try:
        return int(text)
    except ValueError as e:
        raise ValueError(f"{text!r}: train, none or an int") from e


class _Parser(flags.ArgumentParser):
    """A flag value parsed by a function (absl reports its ValueError as a bad value)."""

    def __init__(self, function, syntactic_help: str):
        self._function = function
        self.syntactic_help = syntactic_help

    def parse(self, argument):
        return self._function(argument)


def define_flags(fv: flags.FlagValues) -> None:
    """The flags of `evaluate_external`, on `fv`."""
    flags.DEFINE_string(
        "workdir",
        None,
        "a finished training workdir; the report is written to W/eval/NAME",
        flag_values=fv,
        required=True,
    )
    flags.DEFINE_string(
        "data",
        None,
        "the hospital's folder. fundus: DIR/test/ROIs/{image,mask} or DIR/{image,mask} (mask "
        "optional); prostate: DIR/<case>.nii.gz [+ <case>_segmentation.nii.gz]",
        flag_values=fv,
        required=True,
    )
    flags.DEFINE_string("name", None, "report name (default: DIR's name)", flag_values=fv)
    flags.DEFINE_enum(
        "labels",
        "auto",
        list(LABELS),
        "auto: score when masks are there; yes: masks required; no: ignore masks",
        flag_values=fv,
    )
    flags.DEFINE(
        _Parser(parse_fail_dice, "a number or STRUCTURE=VALUE pairs"),
        "fail_dice",
        quality.DEFAULT_FAIL_DICE,
        "a case fails below this Dice: 0.9, or per structure OD=0.9,OC=0.8",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "qc_score",
        "auto",
        ["auto", *quality.QC_SCORES],
        "auto: the score that best finds failures on the run's source validation",
        flag_values=fv,
    )
    flags.DEFINE(
        _Parser(parse_center_crop, "train, none or an int"),
        "center_crop",
        "train",
        "fundus: train (the crop the model saw), none (whole images) or a side in pixels",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "framing",
        "auto",
        ["auto", "photo", "region"],
        "fundus: auto (whole photographs or regions, decided per image), photo (locate the disc "
        "in every image first) or region (predict each image as a region, as released)",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "overwrite", False, "replace an earlier eval/NAME of this command", flag_values=fv
    )


def parse_flags(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command line as `evaluate_external`'s keyword arguments.

    Args:
      argv: command-line arguments, program name excluded (None: sys.argv[1:]).

    Returns:
      workdir, data, name, labels, fail_dice, qc_score, center_crop, framing, overwrite.
    """
    fv, args = cli.parse(argv, __doc__, define_flags, PROG)
    cli.no_positional(args, PROG)
    names = ("workdir", "data", "name", "labels", "fail_dice", "qc_score", "center_crop", "framing")
    return {name: fv[name].value for name in (*names, "overwrite")}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`python -m puseg_jax.evaluate`: flags -> the run's log -> `evaluate_external`.

    Args:
      argv: command-line arguments, program name excluded (None: sys.argv[1:]).

    Returns:
      The written summary.
    """
    kwargs = parse_flags(argv)
    # Imported here, after absl's log handler is installed: orbax and grain log on import.
    from puseg_jax.external.pipeline import evaluate_external
    from puseg_jax.runs.run_folder import RunFolder

    # The workdir's log.txt, as a training run's: only in a training workdir, so that a mistyped
    # --workdir stops with its message without becoming a folder.
    trained = RunFolder(kwargs["workdir"]).has_config()
    with cli.console(kwargs["workdir"] if trained else None):
        return evaluate_external(**kwargs)


if __name__ == "__main__":
    # The user's mistakes (DataError is a ValueError): the message, not a traceback.
    cli.run(main, user_errors=(ValueError, FileNotFoundError, FileExistsError))
