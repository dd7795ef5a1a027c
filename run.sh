#!/usr/bin/env bash
# puseg_jax: the commands a user needs. `./run.sh --help` lists them.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${PUSEG_VENV:-.venv}
PY="$VENV/bin/python"

usage() {
  cat <<'USAGE'
Usage: ./run.sh COMMAND [ARGS]

  setup                 create .venv (if missing) and install the pinned stack + test extras
  demo [WORKDIR]        build the synthetic data, train erm and ours on the synthetic source
                        domains, evaluate on the held-out domain, print the table
                        (default WORKDIR: workdirs/demo)
  test [PYTEST ARGS]    run the test suite on CPU with 8 fake devices
  lint                  ruff check + ruff format --check
  experiments FAMILY [ARGS]
                        leave-one-domain-out suite (FAMILY: fundus | prostate); ARGS go to
                        `python -m puseg_jax.experiments` (see its --help)
  bench [NAME]          benchmarks: train_step | metrics | input_pipeline | eval (default: all)
  help                  this text
USAGE
}

# pip with its output in $VENV/pip.log: its warnings (e.g. "Location ... is ignored" from a pip
# config) stay out of the console; on failure the log's end is shown, errors included.
pip_quiet() {
  local log="$VENV/pip.log"
  echo "\$ pip $*" >>"$log"
  if ! "$PY" -m pip "$@" >>"$log" 2>&1; then
    echo "[setup] pip $* failed; the end of $log:" >&2
    grep -v "^WARNING: Location .* is ignored" "$log" | tail -n 40 >&2
    exit 1
  fi
}

setup() {
  if [ ! -x "$PY" ]; then
    echo "[setup] creating $VENV"
    python3 -m venv "$VENV"
  fi
  if ! "$PY" -c "import puseg_jax, jax, flax, grain, tensorflow_datasets, nbclient, medpy" 2>/dev/null \
     || [ setup.cfg -nt "$VENV/.installed" ]; then
    : >"$VENV/pip.log"
    echo "[setup] upgrading pip"
    pip_quiet install --upgrade pip
    echo "[setup] installing the pinned stack and test extras (about a minute; log: $VENV/pip.log)"
    pip_quiet install -e '.[test]'
    touch "$VENV/.installed"
    echo "[setup] done"
  fi
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup) setup ;;
  demo)
    setup
    workdir=${1:-workdirs/demo}
    start=$(date +%s)
    for method in erm ours; do
      rm -rf "$workdir/$method"
      "$PY" -m puseg_jax.main --config configs/demo.py --workdir "$workdir/$method" \
        --config.method="$method"
    done
    "$PY" -m puseg_jax.report "$workdir/erm/summary.json" "$workdir/ours/summary.json"
    echo "[demo] done in $(( $(date +%s) - start )) s (install excluded); outputs and full" \
      "logs (log.txt) in $workdir/{erm,ours}; PUSEG_VERBOSE=1 shows the logs here"
    ;;
  test)
    setup
    export XLA_FLAGS="--xla_force_host_platform_device_count=8"
    export JAX_PLATFORMS=cpu
    "$PY" -m pytest "$@"
    ;;
  lint)
    setup
    "$VENV/bin/ruff" check . && "$VENV/bin/ruff" format --check .
    ;;
  experiments)
    setup
    "$PY" -m puseg_jax.experiments "$@"
    ;;
  bench)
    setup
    name=${1:-all}
    for b in train_step metrics input_pipeline eval; do
      if [ "$name" = all ] || [ "$name" = "$b" ]; then
        echo "== benchmarks/bench_$b.py"
        "$PY" "benchmarks/bench_$b.py" "${@:2}"
      fi
    done
    ;;
  help|-h|--help) usage ;;
  *) echo "Unknown command: $cmd"; usage; exit 2 ;;
esac
