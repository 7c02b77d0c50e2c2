#!/usr/bin/env bash
# Usage: OUT=DIR bash benchmarks/omp_bind.sh   (an idle machine; writes DIR/omp-{default,bound}-{1,2}.json/.log)
# the training loop's examples/s with torch's default OpenMP settings and with threads bound to cores,
# alternated A B A B (the variables must be set before the process starts)
cd "$(dirname "$0")/.."
mkdir -p "${OUT:?set OUT to an output directory}"
for rep in 1 2; do
  for arm in default bound; do
    if [ $arm = bound ]; then export OMP_PROC_BIND=close OMP_PLACES=cores; else unset OMP_PROC_BIND OMP_PLACES; fi
    python benchmarks/throughput.py --examples 256 --repeats 2 --threads 2 --out ${OUT:?set OUT}/omp-$arm-$rep.json > ${OUT:?set OUT}/omp-$arm-$rep.log 2>&1
    echo "$arm $rep rc=$?"
  done
done
