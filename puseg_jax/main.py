"""Trains a model (then evaluates it) or evaluates a trained one: `python -m puseg_jax.main`.

    python -m puseg_jax.main --config configs/demo.py --workdir DIR [--mode eval]
        [--config.FIELD=VALUE ...]

`--config` is an ml_collections config file, optionally with an argument
(`configs/fundus.py:Domain1,cpu`); `--config.FIELD=VALUE` overrides one field. DIR receives
`config.json`, `checkpoints/{last,best}`, `tb/` (TensorBoard), `metrics.jsonl`, `log.txt`,
`summary.json` and, per evaluator, `eval/<name>/{summary.json, per_case.csv, predictions.npz,
panel_*.png}`. A run resumes from DIR's own checkpoint. `--mode eval` evaluates DIR's checkpoint
without training.

The console shows the run's `[prepare]`, `[train]` and `[eval]` lines and the table; every log
line (absl, TFDS, orbax, grain at INFO) is in `DIR/log.txt`, and on the console too with
`--verbosity=0` or `1` or `PUSEG_VERBOSE=1`.
"""

import functools
import sys
from collections.abc import Sequence

from absl import flags, logging
from ml_collections import config_flags

from puseg_jax.core import cli

PROG = "python -m puseg_jax.main"


def define_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    """The flags of training, on `fv`; `argv` holds the `--config.FIELD=VALUE` overrides."""
    flags.DEFINE_string(
        "workdir",
        None,
        "Directory for checkpoints, logs and reports (resumed from when it has a checkpoint).",
        flag_values=fv,
        required=True,
    )
    flags.DEFINE_enum(
        "mode", "train", ["train", "eval"], "train (then evaluate) or eval only.", flag_values=fv
    )
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Experiment config file (configs/<name>.py[:ARG]).",
        flag_values=fv,
        lock_config=True,
        # ml_collections reads the overrides from this argv (by default sys.argv).
        sys_argv=[PROG, *argv],
    )
    flags.mark_flag_as_required("config", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m puseg_jax.main`: flags -> the run's log -> `train_and_evaluate` or
    `evaluate_only`.

    Args:
      argv: command-line arguments, program name excluded (None: sys.argv[1:]).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    define = functools.partial(define_flags, argv=argv)
    fv, args = cli.parse(argv, __doc__, define, PROG)
    cli.no_positional(args, PROG)
    with cli.console(fv.workdir):
        # Imported here so that XLA_FLAGS set by the caller apply before JAX starts, and so that
        # nothing logs before absl's handler is installed (orbax and grain log on import, which
        # would give the root logger Python's default console handler).
        import jax

        from puseg_jax.train import trainer

        # Not jax.devices(): that starts the backend, after which a multi-process run can no
        # longer call jax.distributed.initialize (train.py reports the devices once it has).
        logging.info("JAX %s", jax.__version__)
        if fv.mode == "train":
            trainer.train_and_evaluate(fv.config, fv.workdir)
        else:
            trainer.evaluate_only(fv.config, fv.workdir)


if __name__ == "__main__":
    cli.run(main)
