#!/usr/bin/env bash
# One call on a lent accelerator host: install the carried wheels, run a suite with
# benchmarks/gpu_experiments.sh, pack the run records (no checkpoints, predictions or images)
# into $OUT/records.tgz. Arguments and variables are those of gpu_experiments.sh.
#
# The host has jax (CUDA), flax, optax and orbax but not TFDS, grain, ml_collections,
# tensorboardX or nibabel: carry them as Python 3.12 wheels in .whl/ (see the device notes in
# docs/results.md for the download command) and build the data here into .gpu_data/.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "
import sys, jax, flax, optax, orbax.checkpoint, grain, tensorflow_datasets as tfds
print('python', sys.version.split()[0], '| jax', jax.__version__, jax.devices(), '| flax',
      flax.__version__, '| optax', optax.__version__, '| tfds', tfds.__version__)
" || exit 1
root=${2:?usage: gpu_suite.sh DATA_DIR ROOT [TARGETS...]}
bash benchmarks/gpu_experiments.sh "$@"
rc=$?
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/records.tgz" --exclude=checkpoints --exclude=predictions.npz --exclude=tb \
    --exclude='*.png' -C "$(dirname "$root")" "$(basename "$root")"
  ls -la "$OUT"
fi
exit $rc
