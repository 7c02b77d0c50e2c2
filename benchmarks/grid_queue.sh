#!/usr/bin/env bash
# One serial worker of the results grids (docs/results/compare-*): runs the cells listed in QUEUE, one line a
# cell, "TASK OUT ROUNDS METHOD SEEDS" (TASK: mrpc, or sst2 = --task sst2 --train-subset 6000 --target 0.8),
# each as `hlora compare --jobs 1 --threads 1 --precision bf16`, in order. Start two side by side on 2 cores
# (disjoint cells, or the same ones: a cell's lock keeps a second worker off it), with
# benchmarks/commit_cells.sh beside them to commit each finished cell:
#   setsid bash benchmarks/grid_queue.sh QUEUE > QUEUE.out 2>&1 < /dev/null &
# `python benchmarks/grids.py missing` prints a queue of every cell the committed grids lack.
# Do not edit this script while a worker runs: bash reads it as it goes (the queue file may be edited).
# Lines may be appended while it runs; empty lines and lines starting with # are skipped. HLORA_SRC_MRPC / HLORA_SRC_SST2 name the source tree a task's cells run
# on (the grids' earlier seeds ran on a fixed commit, checked out as a worktree; default: this repository's).
set -uo pipefail
queue=${1:?queue file}
here=$(cd "$(dirname "$0")/.." && pwd)
hlora=${HLORA:-$here/.venv/bin/hlora}
while read -r task out rounds method seeds || [ -n "$task" ]; do
  case "$task" in ''|'#'*) continue ;; esac
  case "$task" in
    mrpc) src=${HLORA_SRC_MRPC:-$here/src}; extra=(--task mrpc) ;;
    sst2) src=${HLORA_SRC_SST2:-$here/src}; extra=(--task sst2 --train-subset 6000 --target 0.8) ;;
    *) echo "unknown task $task (mrpc or sst2)"; continue ;;
  esac
  echo "$(date -u +%T) start $task $out $rounds $method $seeds"
  PYTHONPATH=$src "$hlora" compare "${extra[@]}" --rounds "$rounds" --seeds "$seeds" --strategies "$method" \
    --jobs 1 --threads 1 --precision bf16 --out "$out" >> "$queue.log" 2>&1 < /dev/null
  rc=$?
  echo "$(date -u +%T) end $method $seeds rc=$rc"
done < "$queue"
