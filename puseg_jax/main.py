"""Entry point: `python -m puseg_jax.main --config configs/demo.py --workdir DIR [--mode eval]`.

The only module that knows about flags; everything else takes a config and a workdir.
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
    # Imported here so that XLA_FLAGS set by the caller apply before JAX starts.
    import jax

    from puseg_jax import train

    # Not jax.devices(): that starts the backend, after which a multi-process run can no longer
    # call jax.distributed.initialize (train.py reports the devices once it has).
    logging.info("JAX %s", jax.__version__)
    os.makedirs(FLAGS.workdir, exist_ok=True)
    if FLAGS.mode == "train":
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    else:
        train.evaluate_only(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
