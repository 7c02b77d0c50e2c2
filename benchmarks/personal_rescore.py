"""Re-score finished runs under personalised evaluation, without training: each client's model on the held-out
share of its own examples (the seeded split of fedsa and --personal-eval), with plain logits and with the
client's own label prior added (its logit-adjustment training offset tau (log pi_k - log pi)), beside the
baseline of each client predicting its own training share's majority label.

    python benchmarks/personal_rescore.py RUN_DIR [RUN_DIR ...] [--out FILE.json]

A run of a global strategy is scored with its global model on every client's share (it must have been
trained with --personal-eval, or its clients trained on the held-out examples: refused); a personalised
strategy (fedsa) with each client's own model (the same models its rows' personal_accuracy scored).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hlora.client_state import own_majority, split_holdout
from hlora.data import encode
from hlora.inference import Predictor, load_run
from hlora.metrics import predict_logits
from hlora.objectives import label_counts, offset_from_counts
from hlora.strategies import get_strategy


def rescore(run_dir: Path) -> dict:
    run = load_run(run_dir)
    cfg = run.cfg
    personal = get_strategy(cfg.strategy, **cfg.strategy_options).personal
    if not personal and not cfg.personal_eval:
        raise SystemExit(f"{run_dir}: a {cfg.strategy} run without --personal-eval trained on the held-out shares")
    p = Predictor(run)
    labels = p.task.train.labels
    train, held = split_holdout(cfg.client_parts(p.task), cfg.personal_holdout, cfg.seed)
    fed = label_counts(labels, p.task.num_labels)
    plain = prior = total = 0
    for k, (tr, ho) in enumerate(zip(train, held)):
        if not ho:
            continue
        model = load_run(run_dir, client=k) if personal else run
        data = encode(p.tokenizer, p.task.train.subset(ho), cfg.max_length)
        with torch.no_grad():
            logits = predict_logits(p.fm, model.adapter, model.head, data, cfg.eval_batch_size)
        offset = offset_from_counts(label_counts([labels[i] for i in tr], p.task.num_labels), fed, cfg.logit_adjust)
        plain += int((logits.argmax(-1) == data.labels).sum())
        prior += int(((logits + offset).argmax(-1) == data.labels).sum())
        total += len(ho)
    return {"run": str(run_dir), "strategy": cfg.strategy, "seed": cfg.seed, "round": run.round,
            "held_out": total, "personal_accuracy": plain / total, "personal_accuracy_prior": prior / total,
            "logit_adjust": cfg.logit_adjust, "own_majority": own_majority(labels, train, held)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    for run_dir in args.runs:
        r = rescore(run_dir)
        rows.append(r)
        print(f"{r['strategy']} seed {r['seed']} round {r['round']}: {r['held_out']} held-out examples; personal "
              f"{100 * r['personal_accuracy']:.1f}%, with the client's prior {100 * r['personal_accuracy_prior']:.1f}%,"
              f" each client's own majority label {100 * r['own_majority']:.1f}%", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
