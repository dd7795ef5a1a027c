#!/usr/bin/env bash
# A leave-one-domain-out suite (docs/results.md) at the fixed CPU budget
# (configs/<family>.py:<target>,cpu: 128x128, widths 16-256, batch 8, 2000 steps), run on one
# accelerator host with every (target, method, seed) as its own concurrent process.
#
# Usage: [FAMILY=fundus|prostate] [PYTHON=python3] [METHODS="ours erm ..."] [SEEDS="0 1 2"]
#        [EXTRA="--config.x=y ..."] bash benchmarks/gpu_experiments.sh DATA_DIR ROOT [TARGETS...]
#   DATA_DIR: a TFDS dir holding the family's domains, already built (the host has no data):
#             fundus built with store_size=128 (the runs pass
#             --config.data.build_kwargs.store_size=128 so they open those variants; the pixels
#             the network sees are the same as from the 512x512 release, see docs/data.md);
#             prostate: the ProstateSlice sites as the prostate config builds them.
#   ROOT:     experiments root (one workdir per run, then ROOT/<family>/results.md).
# Defaults: fundus, targets Domain1 Domain3, all seven methods, seeds 0 1 2 for ours/erm and 0 for
# the others; prostate, all six sites, SEEDS applies to every method.
set -uo pipefail
cd "$(dirname "$0")/.."
family=${FAMILY:-fundus}
data_dir=$1
root=$2
shift 2
case $family in
  fundus) default_targets="Domain1 Domain3"; family_args=(--config.data.build_kwargs.store_size=128) ;;
  prostate) default_targets="RUNMC BMC I2CVB UCL BIDMC HK"; family_args=() ;;
  *) echo "unknown FAMILY $family"; exit 2 ;;
esac
targets=("${@:-$default_targets}")
read -r -a targets <<<"${targets[*]}"
# Many small runs share the GPU: each takes a slice of its memory instead of preallocating 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.04}
py=${PYTHON:-python3}
methods=${METHODS:-ours erm erm_nll focal topk entropy ours_no_highlight}
read -r -a extra <<<"${EXTRA:-}"
mkdir -p "$root"
start=$(date +%s)
pids=()
for target in "${targets[@]}"; do
  for method in $methods; do
    if [ -n "${SEEDS:-}" ]; then seeds=$SEEDS
    else case $method in ours|erm) seeds="0 1 2" ;; *) seeds="0" ;; esac
    fi
    for seed in $seeds; do
      "$py" -m puseg_jax.experiments "$family" "$method" --targets "$target" --seeds "$seed" \
        --root "$root" --data-dir "$data_dir" --manual-dir "" \
        "${family_args[@]}" "${extra[@]}" \
        >"$root.$target.$method.$seed.log" 2>&1 &
      pids+=($!)
    done
  done
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
echo "[gpu_experiments] ${#pids[@]} runs, $failed failed, $(( $(date +%s) - start )) s"
"$py" -m puseg_jax.experiments table "$family" --root "$root"
