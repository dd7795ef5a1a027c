#!/usr/bin/env bash
# Copies the records of the finished runs of a queue (no checkpoints, TensorBoard events,
# predictions or images) into the repository, e.g. docs/results/<name>/:
#   bash benchmarks/queues/collect_records.sh /work/qruns docs/results/fundus_cpu_queue
# A run is copied once its summary.json exists, at its path under QUEUE_ROOT (NAME for a run
# line, FAMILY/SUITE/TARGET/VARIANT/seedK for an `experiments` line); the queue's log comes along.
set -euo pipefail
root=${1:?usage: collect_records.sh QUEUE_ROOT DEST}
dest=$(realpath -m "${2:?usage: collect_records.sh QUEUE_ROOT DEST}")
mkdir -p "$dest"
root=$(realpath "$root")
find "$root" -name summary.json -not -path '*/eval/*' -not -path '*/checkpoints/*' | sort |
while read -r summary; do
  run=$(dirname "$summary")
  name=${run#"$root"/}
  mkdir -p "$dest/$name"
  (cd "$run" && find . -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.csv' \
    -o -name 'log.txt' -o -name 'queue_stdout.txt' \) -not -path './checkpoints/*' \
    -not -path './tb/*' -print0 | xargs -0 -I{} cp --parents {} "$dest/$name/")
  echo "[collect] $name"
done
[ -f "$root/queue.log" ] && cp "$root/queue.log" "$dest/queue.log"
