#!/usr/bin/env bash
# The GPU benchmark of issue 15 in one run (< 7 minutes): JAX against PyTorch, both frameworks
# alternating round by round (bench_train_step.py), bf16 unless a row says otherwise.
#
#   1. anchors at demo, fundus 8x256x256x3 and prostate 8x384x384x1: JAX (impl=auto: XLA's own
#      convolutions), PyTorch eager channels_last (bf16 autocast), torch.compile default and
#      max-autotune (a row whose compilation passes the start timeout is dropped, with a note);
#   2. levers at prostate (float32, 4 steps per compiled call, remat, the input layer padded to 8
#      channels, XLA autotuning off), PyTorch float32, a batch sweep (32, 64) at both paper
#      shapes, and the same step on all visible devices (parallel.strategy='jit') when there
#      are several;
#   3. first-step time cold (empty persistent compilation cache) and warm (a new process with
#      the cache the first one wrote), fundus and prostate.
# Each part has its own deadline and timeout, so one failure loses that part only; the tables
# are printed at the end and, with $OUT set, written there (summary.md, *.json, log.txt).
# The matmul peak (8192^2 bf16, each framework) is measured in each part.
#
# Needs only python3 with jax (CUDA), flax, optax, numpy and torch (CUDA): puseg_jax.model.unet and
# conv_ops import only jax and flax.
#
# Usage, from anywhere:  bash benchmarks/gpu.sh         (GPU)
#                        bash benchmarks/gpu.sh --cpu   (the same parts at a tiny shape on the
#                                                       CPU: checks that everything runs)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # many JAX and PyTorch workers share the GPU
py=${PYTHON:-python3}
out=${OUT:-$(mktemp -d /tmp/puseg_gpu_bench.XXXX)}
mkdir -p "$out"
log="$out/log.txt"
start=$(date +%s)

if [ "${1:-}" = "--cpu" ]; then
  device=cpu; main_shapes="tiny"; paper="tiny"; batches="4"; rounds=(--warmup 1 --steps 2 --steps-per-round 2)
  # Generous limits: the CPU run only checks that every part runs; the GPU limits are below.
  t1=(600 560 400); t2=(600 560 400); t3=(400 380)
else
  device=gpu; main_shapes="demo fundus prostate"; paper="fundus prostate"; batches="32 64"
  rounds=(--warmup 1 --steps 5 --steps-per-round 10)
  # (hard timeout, deadline, start timeout) in seconds; 410 s in all at most.
  t1=(185 170 120); t2=(135 120 100); t3=(75 65)
fi
bench=("$py" benchmarks/bench_train_step.py --device "$device" --dtype bfloat16 --impl auto)

{
  echo "== environment"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  timeout 60 "$py" -c "
import sys, jax, flax, optax, torch
import puseg_jax.model.unet  # must import with jax/flax only
print('python', sys.version.split()[0], '| jax', jax.__version__, jax.devices(), '| flax',
      flax.__version__, '| optax', optax.__version__, '| torch', torch.__version__,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')
"
} 2>&1 | tee "$out/env.txt"
ndev=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
[ "$device" = cpu ] && ndev=2
multi=()
if [ "${ndev:-0}" -gt 1 ]; then
  # images/s per device against the one-device rows of the same run
  multi=(--jax-config "{\"devices\": $ndev, \"shapes\": [\"fundus\", \"prostate\", \"tiny\"]}")
fi

echo "== part 1: anchors" | tee -a "$log"
timeout "${t1[0]}" "${bench[@]}" --shapes $main_shapes \
  --frameworks jax torch_cl torch_compile torch_compile_max --parallel-start \
  --start-timeout "${t1[2]}" --deadline "${t1[1]}" --round-timeout 60 "${rounds[@]}" \
  --json "$out/part1.json" --markdown "$out/part1.md" 2>>"$log" \
  || echo "part 1 exited with $?" | tee -a "$log"

echo "== part 2: levers, batch sweep, devices" | tee -a "$log"
timeout "${t2[0]}" "${bench[@]}" --shapes $paper --frameworks jax torch_cl --parallel-start \
  --jax-config '{"dtype": "float32", "shapes": ["prostate", "tiny"]}' \
  --jax-config '{"spc": 4, "shapes": ["prostate", "tiny"]}' \
  --jax-config '{"remat": true, "shapes": ["prostate", "tiny"]}' \
  --jax-config '{"pad_in": 8, "shapes": ["prostate", "tiny"]}' \
  --jax-config '{"xla_flags": "--xla_gpu_autotune_level=0", "shapes": ["prostate"]}' \
  --torch-config '{"dtype": "float32", "shapes": ["prostate", "tiny"]}' \
  "${multi[@]}" --batches $batches --sweep-frameworks jax torch_cl \
  --start-timeout "${t2[2]}" --deadline "${t2[1]}" --round-timeout 60 "${rounds[@]}" \
  --json "$out/part2.json" --markdown "$out/part2.md" 2>>"$log" \
  || echo "part 2 exited with $?" | tee -a "$log"

echo "== part 3: first step, cold and warm compilation cache" | tee -a "$log"
timeout "${t3[0]}" "${bench[@]}" --shapes $paper --frameworks jax --deadline "${t3[1]}" \
  --cache-test "$out/jax_cache" --json "$out/part3.json" --markdown "$out/part3.md" 2>>"$log" \
  || echo "part 3 exited with $?" | tee -a "$log"
rm -rf "$out/jax_cache"  # large, and not a result

{
  echo "# benchmarks/gpu.sh ($device), $(( $(date +%s) - start )) s"
  echo
  cat "$out/env.txt"
  for part in 1 2 3; do
    echo
    echo "## part $part"
    cat "$out/part$part.md" 2>/dev/null || echo "(no table: see log.txt)"
  done
} >"$out/summary.md"
rm -f "$out"/part?.md  # all in summary.md: $OUT returns at most 8 files
cat "$out/summary.md"
echo "(written to $out)"
