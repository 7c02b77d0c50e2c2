#!/usr/bin/env bash
# Commit the finished cells of a running `hlora compare` grid as they come, so that a lost machine loses
# only the running cells. Usage (from the repository, beside the grid):
#   bash benchmarks/commit_cells.sh GRID_OUT DOCS_DIR [SECONDS]
# Every SECONDS (default 120) while a cell of GRID_OUT is held (its <cell>.lock names the pid of a live
# `hlora compare`; a lock file left by a killed run does not count), a compare into GRID_OUT runs, or a
# benchmarks/grid_queue.sh worker runs (it may start a cell of GRID_OUT next): each cell GRID_OUT/<method>/seed<k>
# with a summary.json not yet in DOCS_DIR gets its metrics.jsonl, summary.json, config.yaml and
# dev_predictions.json copied to DOCS_DIR/<method>/seed<k>/ and committed (only those paths).
set -euo pipefail
grid=${1:?grid directory}; docs=${2:?docs directory}; every=${3:-120}
cd "$(dirname "$0")/.."
commit_new() {
  local cell method seed dest
  for cell in "$grid"/*/seed*/; do
    cell=${cell%/}
    [ -f "$cell/summary.json" ] || continue
    method=$(basename "$(dirname "$cell")"); seed=$(basename "$cell")
    dest="$docs/$method/$seed"
    [ -f "$dest/summary.json" ] && continue
    mkdir -p "$dest"
    for f in metrics.jsonl summary.json config.yaml dev_predictions.json; do
      [ -f "$cell/$f" ] && cp "$cell/$f" "$dest/"
    done
    # a commit can fail while the checkout is mid-merge: undo the copy, and the next pass tries again
    git add -- "$dest" && git commit -q -m "$docs: cell $method/$seed ($(python -c "import json,sys; s=json.load(open(sys.argv[1])); print(f\"final {100*s['final_accuracy']:.1f}%, best {100*s['best_accuracy']:.1f}%\")" "$cell/summary.json"))" -- "$dest" \
      || { echo "not committed yet: $dest"; git reset -q -- "$dest"; rm -rf "$dest"; continue; }
    echo "committed $dest"
  done
}
running() {  # a live claim, a compare that has not claimed its next cell yet, or a queue worker between cells
  # the claim's holder writes its pid into the lock (hlora.compare.claim); the lock itself is not touched
  # here, since taking it even for a moment would make a starting cell see it as taken
  local lock pid
  for lock in "$grid"/*/seed*.lock; do
    pid=$(cat "$lock" 2>/dev/null) || continue
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && return 0
  done
  pgrep -f "hlora.*compare.*$grid" >/dev/null || pgrep -f "benchmarks/grid_queue.sh" >/dev/null
}
while true; do
  commit_new
  running || break
  sleep "$every"
done
commit_new
