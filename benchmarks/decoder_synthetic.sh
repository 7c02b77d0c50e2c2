#!/usr/bin/env bash
# HLoRA and Fed-PLoRA on the synthetic instruction set with the tiny random Llama (hlora.toy):
# the decoder workflow end to end, and its loss curves. Output: docs/results/decoder-synthetic/.
#   bash benchmarks/decoder_synthetic.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-runs/decoder-synthetic}
out=docs/results/decoder-synthetic
mkdir -p "$work" "$out"
[ -d "$work/toy/model" ] || python -m hlora.toy "$work/toy"
for strategy in hlora fedplora; do
  [ -f "$work/$strategy/summary.json" ] && continue
  if [ -f "$work/$strategy/checkpoint.pt" ]; then hlora run --resume "$work/$strategy"; continue; fi
  hlora run --task instruct --model "$work/toy/model" --train "$work/toy/train.jsonl" --dev "$work/toy/dev.jsonl" \
    --target-modules q_proj,k_proj,v_proj,o_proj --strategy "$strategy" --ranks 2-8 \
    --clients 20 --per-round 5 --rounds 30 --local-epochs 2 --batch-size 8 --lr 1e-2 \
    --gen-samples 16 --max-new-tokens 16 --threads 1 --out "$work/$strategy"
done
hlora plot "$work/hlora" "$work/fedplora" --out "$out" --title "tiny Llama, synthetic instructions"
python - "$work" "$out" <<'PY'
import json, sys
work, out = sys.argv[1:]
lines = ["| round | " + " | ".join(f"{s} loss | {s} ROUGE-L" for s in ("hlora", "fedplora")) + " |",
         "| --- |" + " --- |" * 4]
rows = {s: [json.loads(l) for l in open(f"{work}/{s}/metrics.jsonl")] for s in ("hlora", "fedplora")}
for i in range(len(rows["hlora"])):
    cells = [f"{rows[s][i]['eval_loss']:.3f} | {rows[s][i]['rouge_l']:.3f}" for s in ("hlora", "fedplora")]
    lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
open(f"{out}/table.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
