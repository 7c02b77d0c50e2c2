#!/usr/bin/env bash
# Wall time of the same small `hlora compare` grid at --jobs 1 (1 and 2 threads) and --jobs 2 (1 thread a
# cell), on this machine. Usage: bash benchmarks/compare_jobs.sh OUT [ROUNDS] [STRATEGIES] [SEEDS]
# Writes OUT/jobs.md (one row per setting) and keeps each grid under OUT/<setting>/. Run it on an idle
# machine: the point is the ratio.
set -euo pipefail
out=${1:?output directory}; rounds=${2:-2}; strategies=${3:-hlora,fedit:ranks=8}; seeds=${4:-0,1}
hlora=${HLORA:-hlora}
mkdir -p "$out"
{
  echo "# \`hlora compare\` wall time by --jobs ($(date -u +%F), $(nproc) cores, load before: $(cut -d' ' -f1 /proc/loadavg))"
  echo
  echo "Grid: --strategies $strategies --seeds $seeds --rounds $rounds (MRPC, the run defaults otherwise)."
  echo
  echo "| setting | wall s | cells |"
  echo "| --- | ---: | ---: |"
} > "$out/jobs.md"
for setting in "1 1" "1 2" "2 1"; do
  set -- $setting
  name="jobs$1-threads$2"
  rm -rf "${out:?}/$name"
  start=$(date +%s.%N)
  "$hlora" compare --task mrpc --strategies "$strategies" --seeds "$seeds" --rounds "$rounds" \
    --jobs "$1" --threads "$2" --out "$out/$name" > "$out/$name.log" 2>&1
  end=$(date +%s.%N)
  cells=$(ls -d "$out/$name"/*/seed*/summary.json 2>/dev/null | wc -l)
  printf '| --jobs %s --threads %s | %.1f | %s |\n' "$1" "$2" "$(echo "$end - $start" | bc)" "$cells" >> "$out/jobs.md"
done
cat "$out/jobs.md"
