"""Speed levers of the default model on this machine, interleaved in one process: fp32 vs bf16 autocast
(training and evaluation examples/s), SDPA vs eager attention, and torch.compile.

    python benchmarks/precision.py [--examples 256] [--threads 2] [--repeats 3] [--compile] [--out FILE.json]

Training: one client's local loop (hlora.client.train_client: AdamW, batch 16, length-grouped, rank 8 on
query/value) over ``--examples`` MRPC training examples. Evaluation: the 408-example MRPC dev set
(hlora.metrics.evaluate, length-sorted, batch 128). Each repeat runs every arm once, in an order rotated
from one repeat to the next; reported are the median and range of examples/s, and the ratio to fp32 +
SDPA within each repeat.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hlora.client import train_client
from hlora.data import encode, load_task
from hlora.factors import init_factors
from hlora.metrics import evaluate
from hlora.model import FederatedModel, load_classifier, set_dropout
from hlora.strategies import Payload


def build(attn: str, compile_model: bool = False, dropout: float | None = None):
    model, tok = load_classifier("minilm", 2, 0)
    set_dropout(model, dropout)
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    fm = FederatedModel(model)
    if compile_model:
        fm.model.forward = torch.compile(fm.model.forward, dynamic=True)
    return fm, tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also an arm with torch.compile (dynamic shapes)")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = load_task("mrpc")
    arms = {"fp32-sdpa": ("fp32", "sdpa", False), "bf16-sdpa": ("bf16", "sdpa", False),
            "fp32-eager": ("fp32", "eager", False), "bf16-eager": ("bf16", "eager", False),
            "bf16-sdpa-nodrop": ("bf16", "sdpa", False), "bf16-eager-nodrop": ("bf16", "eager", False)}
    if args.compile:
        arms["bf16-eager-nodrop-compiled"] = ("bf16", "eager", True)
    models = {}
    for name, (_, attn, comp) in arms.items():
        models[name] = build(attn, comp, 0.0 if "nodrop" in name else None)
    fm0, tok = models["fp32-sdpa"]
    train = encode(tok, task.train, 128)
    dev = encode(tok, task.dev, 128)
    idx = list(range(args.examples))
    lora = init_factors(fm0.shapes, 8, torch.Generator().manual_seed(0))
    for f in lora.values():
        f.scale = 2.0
    res: dict[str, dict[str, list[float]]] = {n: {"train": [], "eval": []} for n in arms}
    first_call: dict[str, float] = {}
    names = list(arms)
    for rep in range(args.repeats + 1):  # repeat 0 warms up (and compiles)
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            prec = arms[name][0]
            fm, _ = models[name]
            fm.precision = prec
            t0 = time.perf_counter()
            train_client(fm, Payload(lora, fm.head_state()), train, idx, client_id=0, epochs=1, lr=1e-3,
                         batch_size=args.batch_size, seed=rep)
            t_train = time.perf_counter() - t0
            t0 = time.perf_counter()
            evaluate(fm, lora, fm.head_state(), dev, 128, 1)
            t_eval = time.perf_counter() - t0
            if rep == 0:
                first_call[name] = t_train + t_eval
                continue
            res[name]["train"].append(len(idx) / t_train)
            res[name]["eval"].append(len(dev) / t_eval)
    base = res["fp32-sdpa"]
    print(f"threads {args.threads}, {args.examples} training examples, {len(dev)} dev examples, {args.repeats} repeats")
    print(f"{'arm':22s} {'train ex/s':>22s} {'x fp32':>6s} {'eval ex/s':>22s} {'x fp32':>6s} {'first call s':>12s}")
    summary = {}
    for name in arms:
        r = res[name]
        tr = [a / b for a, b in zip(r["train"], base["train"])]
        ev = [a / b for a, b in zip(r["eval"], base["eval"])]
        med = lambda xs: f"{statistics.median(xs):7.1f} [{min(xs):.1f}-{max(xs):.1f}]"
        print(f"{name:22s} {med(r['train']):>22s} {statistics.median(tr):6.2f} {med(r['eval']):>22s} "
              f"{statistics.median(ev):6.2f} {first_call[name]:12.1f}")
        summary[name] = {"train": r["train"], "eval": r["eval"], "train_ratio": tr, "eval_ratio": ev,
                         "first_call_s": first_call[name]}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"args": vars(args), "arms": summary}, fh, indent=2)


if __name__ == "__main__":
    main()
