#!/usr/bin/env bash
# The U-Net train-step benchmark on a GPU, bf16 for both frameworks: prints the markdown table.
#
# Needs only python3 with jax (CUDA), flax, optax, numpy and torch (CUDA); none of the project's
# other dependencies (puseg_jax.models and conv_ops import only jax and flax). About 5 minutes on
# one H100: three shapes, each framework compiled/autotuned once, 100 timed steps each.
#
# Usage, from anywhere: bash benchmarks/gpu.sh [extra bench_train_step.py arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and PyTorch workers share the GPU

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "
import jax, flax, optax, torch
import puseg_jax.models  # must import with jax/flax only
print('python', __import__('sys').version.split()[0], '| jax', jax.__version__, jax.devices(),
      '| flax', flax.__version__, '| optax', optax.__version__,
      '| torch', torch.__version__, torch.cuda.get_device_name(0))
"
# impl auto resolves to XLA's own convolutions on GPU; 5 steps per timed round keep the
# host-side round trip between the benchmark's processes out of the per-step time.
timeout 450 python3 benchmarks/bench_train_step.py \
  --device gpu --dtype bfloat16 --impl auto --frameworks jax torch torch_cl monai \
  --shapes demo fundus prostate --warmup 3 --steps 20 --steps-per-round 5 "$@"
