"""Entry point: `python -m puseg_jax.main --config configs/demo.py --workdir DIR [--mode eval]`.

The only module that knows about flags; everything else takes a config and a workdir. The
console shows the run's `[prepare]`, `[train]` and `[eval]` lines and the table; every log line
(absl, TFDS, orbax, grain at INFO) is in `WORKDIR/log.txt`, and on the console too with
`--verbosity=0` or `1` or `PUSEG_VERBOSE=1` (`logging_utils.setup_run_log`).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (then evaluate) or eval only.")
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from puseg_jax.core import logging_utils

    # absl's --verbosity counts as a request for the library logs only when given: app.run
    # raises its default to INFO, which would flood the console.
    verbose = FLAGS["verbosity"].present > 0 or logging_utils.verbose_from_env()
    logging_utils.setup_run_log(FLAGS.workdir, verbose)
    # Imported here so that XLA_FLAGS set by the caller apply before JAX starts.
    import jax

    from puseg_jax.train import trainer

    # Not jax.devices(): that starts the backend, after which a multi-process run can no longer
    # call jax.distributed.initialize (train.py reports the devices once it has).
    logging.info("JAX %s", jax.__version__)
    os.makedirs(FLAGS.workdir, exist_ok=True)
    if FLAGS.mode == "train":
        trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    else:
        trainer.evaluate_only(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
