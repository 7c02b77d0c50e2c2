"""Server aggregation at LLM scale: one round of 20 clients, ranks 2..8, every strategy.

    python benchmarks/aggregate.py [--model llama7b|roberta-large] [--dense-layers 1] [--out FILE.json]

Each strategy runs in a fresh subprocess so that its peak resident memory is its own. For the SVD-based
methods the same round is also computed the way FlexLoRA's public code does it (form the dense d x k
sum, full SVD) on ``--dense-layers`` layers, with the largest difference between the two results; the
dense time for the whole model is that measurement scaled by the number of layers (said so in the output).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

SHAPES = {
    # 32 layers: q, k, v, o 4096 x 4096; gate, up 11008 x 4096 (d x k); down 4096 x 11008
    "llama7b": (32, {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
                     "o_proj": (4096, 4096), "gate_proj": (11008, 4096), "up_proj": (11008, 4096),
                     "down_proj": (4096, 11008)}),
    # 24 layers, 1024 wide: attention query, key, value, output, and the FFN
    "roberta-large": (24, {"query": (1024, 1024), "key": (1024, 1024), "value": (1024, 1024),
                           "attention.output.dense": (1024, 1024), "intermediate.dense": (4096, 1024),
                           "output.dense": (1024, 4096)}),
}
STRATEGIES = ["hlora", "flexlora", "hetlora", "fedit", "flora", "ffa", "fedplora"]


def round_inputs(model: str, layers: int | None = None, seed: int = 0):
    """The shapes, 20 clients' ranks (2..8; all 8 for fedit) and their trained factors."""
    from hlora.factors import Factor

    n_layers, per_layer = SHAPES[model]
    n_layers = layers or n_layers
    shapes = {f"layers.{i}.{name}": s for i in range(n_layers) for name, s in per_layer.items()}
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randint(2, 9, (20,), generator=g).tolist()
    return shapes, ranks, g, Factor


def run_one(model: str, name: str) -> dict:
    from hlora.factors import Factor, init_factors
    from hlora.strategies import ClientSpec, Update, get_strategy

    shapes, ranks, g, _ = round_inputs(model)
    if name == "fedit":
        ranks = [8] * 20
    strategy = get_strategy(name)
    init = init_factors(shapes, max(ranks), g)
    state = strategy.init_state(init, {"head": torch.zeros(2, 16)})
    clients = [ClientSpec(i, dict.fromkeys(shapes, r), 16.0, 100 + 10 * i) for i, r in enumerate(ranks)]
    updates = []
    for c in clients:
        pl = strategy.dispatch(state, c, torch.Generator().manual_seed(c.id))
        lora = {m: Factor(f.B + 0.01 * torch.randn(f.B.shape, generator=g), f.A + 0.01 * torch.randn(f.A.shape, generator=g),
                          f.scale) for m, f in pl.lora.items()}
        updates.append(Update(c.id, lora, {"head": torch.ones(2, 16)}, c.num_examples, dict(pl.info)))
    t0 = time.perf_counter()
    strategy.aggregate(state, updates)
    seconds = time.perf_counter() - t0
    return {"strategy": name, "seconds": seconds, "modules": len(shapes),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def dense_check(model: str, layers: int) -> dict:
    """FlexLoRA's public route on ``layers`` layers: dense sum_k p_k s_k B_k A_k, full SVD; vs factored."""
    from hlora.factors import Factor
    from hlora.strategies.hlora import aggregate_products

    shapes, ranks, g, _ = round_inputs(model, layers)
    p = [1 / 20] * 20
    dense_s = factored_s = 0.0
    worst = 0.0
    for m, (d, k) in shapes.items():
        facs = [Factor(torch.randn(d, r, generator=g) * 0.01, torch.randn(r, k, generator=g) * 0.01, 16.0 / r) for r in ranks]
        t0 = time.perf_counter()
        svd = aggregate_products(facs, p)
        factored_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        dense = sum(pk * f.scale * (f.B @ f.A) for pk, f in zip(p, facs))
        U, S, Vt = torch.linalg.svd(dense, full_matrices=False)
        dense_s += time.perf_counter() - t0
        n = svd.rank
        worst = max(worst, float((S[:n] - svd.S).abs().max() / S[0]),
                    float(((U[:, :n] * S[:n]) @ Vt[:n] - svd.dense()).abs().max() / dense.abs().max()))
    return {"layers": layers, "modules": len(shapes), "dense_seconds": dense_s, "factored_seconds": factored_s,
            "max_relative_difference": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama7b", choices=sorted(SHAPES))
    ap.add_argument("--dense-layers", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.model, args.one)))
        return
    rows = []
    for name in STRATEGIES:
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--one", name],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{name:10s} {row['seconds']:8.2f} s  peak RSS {row['peak_rss_mb']:8.0f} MB  ({row['modules']} modules)",
              flush=True)
    check = dense_check(args.model, args.dense_layers) if args.dense_layers else None
    if check:
        n_layers = SHAPES[args.model][0]
        print(f"dense route (FlexLoRA's code) on {check['layers']} layer(s): {check['dense_seconds']:.2f} s "
              f"(x{n_layers // check['layers']} layers = {check['dense_seconds'] * n_layers / check['layers']:.0f} s estimated "
              f"for the model); factored: {check['factored_seconds']:.3f} s; max relative difference "
              f"{check['max_relative_difference']:.2e}")
    result = {"model": args.model, "threads": torch.get_num_threads(), "strategies": rows, "dense_check": check}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
