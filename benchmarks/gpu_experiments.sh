#!/usr/bin/env bash
# A leave-one-domain-out suite (docs/results.md) at the fixed CPU budget
# (configs/<family>.py:<target>,cpu: 128x128, widths 16-256, batch 8; fundus 4000 steps,
# prostate 2000), run on one accelerator host with every (target, variant, seed) as its own
# concurrent process.
#
# Usage: [FAMILY=fundus|prostate] [PYTHON=python3] [METHODS="ours erm ..."] [SEEDS="0 1 2"]
#        [VARIANTS=FILE] [EXTRA="--config.x=y ..."] [COMPARE="A:B ..."] [CHOOSE=1]
#        [DEADLINE_S=N] bash benchmarks/gpu_experiments.sh DATA_DIR ROOT [TARGETS...]
#   DATA_DIR: a TFDS dir holding the family's domains, already built (the host has no data):
#             fundus built with store_size=128 (the runs pass
#             --config.data.builder_config.store_size=128 so they open those variants; the pixels
#             the network sees are the same as from the 512x512 release, and the masks keep the
#             released grid for native scoring, see docs/data.md);
#             prostate: the ProstateSlice sites as the prostate config builds them.
#   ROOT:     experiments root (one workdir per run, then ROOT/<family>/cpu/results.md).
#   VARIANTS: a file with one variant per line, `METHOD [--config.FIELD=VALUE ...]` (# comments
#             allowed); it replaces METHODS. Each variant runs every target and every seed of
#             SEEDS (default 0 1) and lands in its own folder (python -m puseg_jax.experiments).
#   DEADLINE_S: stop waiting after this many seconds, kill what still runs (its log says so),
#             and aggregate what finished.
# Defaults without VARIANTS: fundus, targets Domain1 Domain3, all methods, seeds 0 1 2 for
# ours/erm and 0 for the others; prostate, all six sites, SEEDS applies to every method.
set -uo pipefail
cd "$(dirname "$0")/.."
family=${FAMILY:-fundus}
data_dir=$1
root=$2
shift 2
case $family in
  fundus) default_targets="Domain1 Domain3"; family_args=(--config.data.builder_config.store_size=128) ;;
  prostate) default_targets="RUNMC BMC I2CVB UCL BIDMC HK"; family_args=() ;;
  *) echo "unknown FAMILY $family"; exit 2 ;;
esac
targets=("${@:-$default_targets}")
read -r -a targets <<<"${targets[*]}"
# Many small runs share the GPU: each takes a slice of its memory instead of preallocating 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.03}
py=${PYTHON:-python3}
read -r -a extra <<<"${EXTRA:-}"
variants=()
if [ -n "${VARIANTS:-}" ]; then
  while IFS= read -r line; do
    line=${line%%#*}
    [ -n "${line// }" ] && variants+=("$line")
  done <"$VARIANTS"
else
  for m in ${METHODS:-ours erm focal topk entropy ours_no_highlight erm_nll}; do variants+=("$m"); done
fi
mkdir -p "$root"
start=$(date +%s)
pids=()
for target in "${targets[@]}"; do
  for v in "${variants[@]}"; do
    read -r -a words <<<"$v"
    method=${words[0]}
    if [ -n "${SEEDS:-}" ]; then seeds=$SEEDS
    elif [ -n "${VARIANTS:-}" ]; then seeds="0 1"
    else case $method in ours|erm) seeds="0 1 2" ;; *) seeds="0" ;; esac
    fi
    tag=$(printf '%s' "$v" | tr -c 'A-Za-z0-9._=+-' '_')
    for seed in $seeds; do
      "$py" -m puseg_jax.experiments "$family" "$method" --targets "$target" --seeds "$seed" \
        --root "$root" --data_dir "$data_dir" --manual_dir "" \
        "${family_args[@]}" "${words[@]:1}" "${extra[@]}" \
        >"$root/runner.$target.$tag.$seed.log" 2>&1 &
      pids+=($!)
    done
  done
done
echo "[gpu_experiments] ${#pids[@]} runs started"
failed=0
deadline=$(( start + ${DEADLINE_S:-100000} ))
for pid in "${pids[@]}"; do
  while kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 2; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "[gpu_experiments] deadline: killing run process $pid"
    pkill -TERM -P "$pid" 2>/dev/null; kill -TERM "$pid" 2>/dev/null
    failed=$((failed + 1))
  else
    wait "$pid" || failed=$((failed + 1))
  fi
done
echo "[gpu_experiments] ${#pids[@]} runs, $failed failed or stopped, $(( $(date +%s) - start )) s"
table_args=()
# COMPARE is space-separated here; the flag takes a comma-separated list.
[ -n "${COMPARE:-}" ] && table_args+=("--compare=$(printf '%s' "$COMPARE" | tr -s ' ' ',')")
[ -n "${CHOOSE:-}" ] && table_args+=(--choose)
"$py" -m puseg_jax.experiments table "$family" --root "$root" "${table_args[@]}"
