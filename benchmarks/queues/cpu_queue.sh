#!/usr/bin/env bash
# A long series of CPU runs as one low-priority background queue that survives session ends:
# every run resumes from its own checkpoint, a run whose summary.json exists is skipped, and a
# failed run is logged and the queue goes on. Run it again (same arguments) to resume.
#
#   nohup setsid bash benchmarks/queues/cpu_queue.sh QUEUE_FILE ROOT [CODE_DIR] >ROOT/queue.log 2>&1 &
#
# QUEUE_FILE: one run a line, `NAME ARGS...`, where ARGS go to `python -m puseg_jax.main`
# (config, method, seed, overrides; no --workdir): the run's workdir is ROOT/NAME. A line
# `experiments ARGS...` runs `python -m puseg_jax.experiments ARGS --root=ROOT` instead (its
# suite layout, run.json and wall_time.json; it skips its finished runs itself). Lines starting
# with '#' are comments. CODE_DIR (default: this checkout) is the tree whose code runs: a git
# worktree pinned at one commit lets a queue run while the checkout itself changes.
# PUSEG_DATA_DIR (TFDS data) is shared between runs; `nice -n 19` keeps the machine usable.
set -uo pipefail
queue=$(realpath "${1:?usage: cpu_queue.sh QUEUE_FILE ROOT [CODE_DIR]}")
root=$(realpath -m "${2:?usage: cpu_queue.sh QUEUE_FILE ROOT [CODE_DIR]}")
code=$(realpath "${3:-$(dirname "$0")/../..}")
py=${PUSEG_PYTHON:-$code/.venv/bin/python}
mkdir -p "$root"
# With the kernel's autogroup scheduling (on by default), a process started with setsid is in
# its own group and `nice` only ranks it within that group: the queue would still take half of
# the machine from an interactive session. The group's own nice value yields it for real.
echo 19 >"/proc/$$/autogroup" 2>/dev/null || true
commit=$(git -C "$code" rev-parse HEAD 2>/dev/null || echo unknown)
echo "[queue] $(date -Is) queue $queue, root $root, code $code at $commit"
grep -v '^\s*#' "$queue" | grep -v '^\s*$' | while read -r name args; do
  if [ "$name" = experiments ]; then
    echo "[queue] $(date -Is) experiments $args"
    # shellcheck disable=SC2086
    (cd "$code" && nice -n 19 "$py" -m puseg_jax.experiments $args --root="$root" \
      >>"$root/experiments_stdout.txt" 2>&1)
    echo "[queue] $(date -Is) experiments: rc $?"
    continue
  fi
  workdir="$root/$name"
  if [ -f "$workdir/summary.json" ]; then
    echo "[queue] done already: $name"
    continue
  fi
  mkdir -p "$workdir"
  # shellcheck disable=SC2086
  printf '{"name": "%s", "args": "%s", "commit": "%s", "cpu": "%s"}\n' "$name" "$args" \
    "$commit" "$(lscpu | sed -n 's/^Model name: *//p')" >"$workdir/run.json"
  echo "[queue] $(date -Is) start $name: $args"
  start=$(date +%s)
  # shellcheck disable=SC2086
  (cd "$code" && nice -n 19 "$py" -m puseg_jax.main $args --workdir="$workdir" \
    >>"$workdir/queue_stdout.txt" 2>&1)
  rc=$?
  end=$(date +%s)
  echo "{\"segment_start\": $start, \"segment_end\": $end, \"returncode\": $rc}" \
    >>"$workdir/wall_segments.jsonl"
  echo "[queue] $(date -Is) end $name: rc $rc after $((end - start)) s"
done
echo "[queue] $(date -Is) queue finished"
