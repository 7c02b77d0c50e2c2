#!/usr/bin/env bash
# The learning issue's targets, each an ordinary `hlora run` whose metrics/summary/config are copied to
# docs/results/learning/<name>/. (The numbers in docs/results/learning.md were measured with the individual
# commands given there; this script reruns the same targets in one place.) Usage:
#   bash benchmarks/learning.sh demo       # the default demo, --strategy centralized, --preset paper (MRPC, 20 rounds)
#   bash benchmarks/learning.sh sst2       # 2,000-example SST-2 subset, 8 clients, 4 per round, seeds 0-2, hlora vs centralized
#   bash benchmarks/learning.sh rte        # RTE: the defaults, centralized, --preset paper
# Runs go to ${RUNS:-runs/learning}; THREADS (default: torch's choice) sets --threads; finished runs are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/learning}
DOCS=docs/results/learning
THREADS_OPT=${THREADS:+--threads $THREADS}
mkdir -p "$RUNS" "$DOCS"

one() {  # one NAME ARGS...: run (or resume) RUNS/NAME, then copy its small files to DOCS/NAME
  local name=$1; shift
  local out="$RUNS/$name"
  if [ -f "$out/summary.json" ]; then echo "$name: done"; 
  elif [ -f "$out/config.yaml" ]; then hlora run --resume "$out";
  else hlora run "$@" $THREADS_OPT --out "$out"; fi
  mkdir -p "$DOCS/$name"
  cp "$out/metrics.jsonl" "$out/summary.json" "$out/config.yaml" "$DOCS/$name/"
}

case "${1:-}" in
  demo)
    one mrpc-default
    one mrpc-centralized --strategy centralized
    one mrpc-paper --preset paper
    ;;
  sst2)
    python benchmarks/sst2_subset.py "$RUNS/sst2-2k" --train 2000 --seed 0 >/dev/null
    data=(--train "$RUNS/sst2-2k/train.tsv" --dev "$RUNS/sst2-2k/dev.tsv" --task sst2 --text-columns sentence
          --label-column label --clients 8 --per-round 4 --rounds 3)
    for seed in 0 1 2; do
      one "sst2-hlora-seed$seed" "${data[@]}" --seed "$seed"
      one "sst2-centralized-seed$seed" "${data[@]}" --seed "$seed" --strategy centralized
      one "sst2-paper-seed$seed" "${data[@]}" --seed "$seed" --preset paper
    done
    ;;
  rte)
    one rte-default --task rte
    one rte-centralized --task rte --strategy centralized
    one rte-paper --task rte --preset paper
    ;;
  *) echo "usage: bash benchmarks/learning.sh demo|sst2|rte" >&2; exit 2 ;;
esac
