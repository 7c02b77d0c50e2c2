"""torch.compile of the base model when the client's LoRA rank changes between clients, against eager
mode: bf16 autocast, batch 8, one client's local loop over 160 MRPC examples per call, the rank cycling
2, 5, 8 from one repeat to the next (as clients of different ranks follow one another in a round).

    python benchmarks/compile_ranks.py [--threads 1] [--repeats 3]

Arms: SDPA with the checkpoint's dropout (session 5's path), SDPA and eager attention without dropout,
eager with dropout, and SDPA without dropout under ``torch.compile(dynamic=True)``. Prints each repeat's
examples/s (repeat 0, the warm-up and first compile, is reported as its time).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hlora.client import train_client
from hlora.data import encode, load_task
from hlora.factors import init_factors
from hlora.model import FederatedModel
from hlora.strategies import Payload
from precision import build  # benchmarks/ is the script's directory, first on sys.path

ARMS = {"sdpa": ("sdpa", None, False), "sdpa-nodrop": ("sdpa", 0.0, False), "eager": ("eager", None, False),
        "eager-nodrop": ("eager", 0.0, False), "sdpa-nodrop-compiled": ("sdpa", 0.0, True)}


def build_bf16(attn: str, dropout: float | None, compiled: bool) -> tuple[FederatedModel, object]:
    fm, tok = build(attn, compiled, dropout)  # benchmarks/precision.py's model of an arm
    fm.precision = "bf16"
    return fm, tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = {name: build_bf16(*arm) for name, arm in ARMS.items()}
    train = encode(models["sdpa"][1], load_task("mrpc").train, 128)
    idx = list(range(160))
    res: dict[str, list[float]] = {n: [] for n in ARMS}
    names = list(ARMS)
    for rep in range(args.repeats + 1):
        rank = (2, 5, 8)[rep % 3]
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            fm = models[name][0]
            lora = init_factors(fm.shapes, rank, torch.Generator().manual_seed(0))
            for f in lora.values():
                f.scale = 16.0 / rank
            t0 = time.perf_counter()
            train_client(fm, Payload(lora, fm.head_state()), train, idx, client_id=0, epochs=1, lr=1e-3,
                         batch_size=8, seed=rep)
            dt = time.perf_counter() - t0
            if rep == 0:
                print(f"{name:22s} first call (rank {rank}) {dt:.1f} s", flush=True)
            else:
                res[name].append(len(idx) / dt)
    for name in ARMS:
        ratio = statistics.median(a / b for a, b in zip(res[name], res["sdpa"]))
        print(f"{name:22s} ex/s per repeat (ranks 5, 8, 2, ...) {[round(x, 1) for x in res[name]]}  x sdpa {ratio:.2f}")


if __name__ == "__main__":
    main()
