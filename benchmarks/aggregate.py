"""Server aggregation at LLM scale: one round of 20 clients, ranks 2..8, every strategy.

    python benchmarks/aggregate.py [--model llama7b|roberta-large] [--threads N] [--dense-layers 1]
                                   [--strategies hlora,flexlora,...] [--repeats 3] [--error-rank 0]
                                   [--robust krum,multikrum,normclip] [--out FILE.json]

Each strategy runs in a fresh subprocess so that its peak resident memory is its own: ``inputs RSS`` is
the peak after building the 20 clients' factors (what the server must hold anyway), ``peak RSS`` the peak
after aggregating. Seconds are wall time and CPU time (user + system of the process; on a shared machine
the CPU time is the steadier of the two).

``--repeats``: the HLoRA round is also timed the way it was computed before the Gram route (QR of the
stacked factors, hlora 0.x at commit becb146: ``v0`` below), alternating the two per module so that the
load of a shared machine hits both alike; reported are the totals of each and the largest difference.

FedEx-LoRA's round also re-decomposes its error term E (the frozen residual, a thin SVD) together with
the round's stacked factors, so its cost grows with E's rank (by up to sum_k r_k + 2R a round, until
min(d, k)): ``--error-rank N`` starts it from a random E of rank N in every module (0: the first round,
no E yet); the row reports E's rank after the round. RoLoRA's round is a B round (the first), whose
cost is that of an A round up to d <-> k. LoRA-FAIR's correction takes r_k x R products per client and an
R x R pseudo-inverse per module on top of FedAvg of the factors.

``--robust RULES``: the robust rules' verdict on the same HLoRA round (``hlora.robust.Robust.judge`` with
f = 4 of 20), each in a fresh process: Krum and Multi-Krum need the 20 x 20 pairwise distances of the
clients' changes ``s B A - s0 B0 A0``, computed from r x r Gram products of the stacked factors; normclip
needs the 20 norms. On ``--dense-layers`` layers the factored distances are checked against the dense
``d x k`` changes (relative difference), with the dense route's time for those layers.

For the SVD-based methods the same round is also computed the way FlexLoRA's public code does it (form
the dense d x k sum, full SVD) on ``--dense-layers`` layers, with the largest difference between the two
results; the dense time for the whole model is that measurement scaled by the number of layers (said
so in the output).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
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
STRATEGIES = ["hlora", "flexlora", "hetlora", "fedit", "flora", "ffa", "fedplora", "fedex", "rolora",
              "lorafair"]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def round_inputs(model: str, layers: int | None = None, seed: int = 0):
    """The module shapes, 20 clients' ranks (2..8) and a generator."""
    n_layers, per_layer = SHAPES[model]
    n_layers = layers or n_layers
    shapes = {f"layers.{i}.{name}": s for i in range(n_layers) for name, s in per_layer.items()}
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randint(2, 9, (20,), generator=g).tolist()
    return shapes, ranks, g


def random_error(d: int, k: int, rank: int, g: torch.Generator):
    """A thin SVD of rank ``rank`` with orthonormal random U, V and decreasing singular values."""
    from hlora.linalg import SVD

    U = torch.linalg.qr(torch.randn(d, rank, generator=g)).Q
    V = torch.linalg.qr(torch.randn(k, rank, generator=g)).Q
    return SVD(U, torch.linspace(1e-2, 1e-4, rank), V.T.contiguous())


def client_updates(model: str, name: str, error_rank: int = 0):
    """One round of trained updates: each client starts from its dispatched payload, factors + noise.
    FedEx-LoRA starts from an error term of rank ``error_rank`` (0: none, its first round). Returns the
    strategy, its state, the updates, the module shapes and the payloads the updates answer."""
    from hlora.factors import Factor, init_factors
    from hlora.strategies import ClientSpec, Update, get_strategy

    shapes, ranks, g = round_inputs(model)
    if name == "fedit":
        ranks = [8] * 20
    strategy = get_strategy(name)
    init = init_factors(shapes, max(ranks), g)
    state = strategy.init_state(init, {"head": torch.zeros(2, 16)})
    if name == "fedex" and error_rank:
        state.extra["residual"] = {m: random_error(d, k, error_rank, g) for m, (d, k) in shapes.items()}
    clients = [ClientSpec(i, dict.fromkeys(shapes, r), 16.0, 100 + 10 * i) for i, r in enumerate(ranks)]
    updates, sent = [], []
    for c in clients:
        pl = strategy.dispatch(state, c, torch.Generator().manual_seed(c.id))
        sent.append(pl)
        lora = {m: Factor(f.B + 0.01 * torch.randn(f.B.shape, generator=g),
                          f.A + 0.01 * torch.randn(f.A.shape, generator=g), f.scale) for m, f in pl.lora.items()}
        updates.append(Update(c.id, lora, {"head": torch.ones(2, 16)}, c.num_examples, dict(pl.info)))
    return strategy, state, updates, shapes, sent


def robust_one(model: str, rule: str, dense_layers: int) -> dict:
    """One robust rule's verdict on an HLoRA round of 20 clients (f = 4); the factored distances against
    the dense ones on the first ``dense_layers`` layers."""
    from hlora.robust import Robust, change_gram, dense_changes, pairwise_sq_distances

    _, _, updates, shapes, sent = client_updates(model, "hlora")
    inputs_mb = peak_mb()
    t0, c0 = time.perf_counter(), cpu_seconds()
    verdict = Robust(rule, f=4).check(20).judge(updates, sent)
    row = {"rule": rule, "seconds": time.perf_counter() - t0, "cpu_seconds": cpu_seconds() - c0,
           "modules": len(shapes), "rejected": sorted(verdict.rejected), "clipped": len(verdict.scales),
           "inputs_rss_mb": inputs_mb, "peak_rss_mb": peak_mb()}
    if dense_layers and rule in ("krum", "multikrum"):
        per_layer = len(SHAPES[model][1])
        some = list(shapes)[: dense_layers * per_layer]
        part = [dataclasses.replace(u, lora={m: u.lora[m] for m in some}, head={}) for u in updates]
        part_sent = [dataclasses.replace(p, lora={m: p.lora[m] for m in some}, head={}) for p in sent]
        t0 = time.perf_counter()
        factored = pairwise_sq_distances(change_gram(part, part_sent))
        row["factored_layers_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        dense = torch.zeros(20, 20, dtype=torch.float64)
        for m in some:
            X = dense_changes(part, part_sent, m).double().flatten(1)
            dense += torch.cdist(X, X) ** 2
        row["dense_layers_seconds"] = time.perf_counter() - t0
        row["dense_layers"] = dense_layers
        row["max_relative_difference"] = float((factored - dense).abs().max() / dense.abs().max())
    return row


def cost(row: dict) -> str:
    """A subprocess row's time and memory, as the strategy and robust lines print them."""
    return (f"{row['seconds']:8.2f} s (cpu {row['cpu_seconds']:7.2f} s)  inputs RSS {row['inputs_rss_mb']:7.0f} MB  "
            f"peak RSS {row['peak_rss_mb']:7.0f} MB")


def run_one(model: str, name: str, error_rank: int = 0) -> dict:
    strategy, state, updates, shapes, _ = client_updates(model, name, error_rank)
    inputs_mb = peak_mb()
    t0, c0 = time.perf_counter(), cpu_seconds()
    new = strategy.aggregate(state, updates)
    row = {"strategy": name, "seconds": time.perf_counter() - t0, "cpu_seconds": cpu_seconds() - c0,
           "modules": len(shapes), "inputs_rss_mb": inputs_mb, "peak_rss_mb": peak_mb()}
    if name == "fedex":
        row["error_rank"] = [error_rank, max(e.rank for e in new.extra["residual"].values())]
    return row


def factored_svd_v0(Bs, As, weights):
    """The factored SVD as hlora computed it before the Gram route (commit becb146): QR of both sides."""
    from hlora.linalg import SVD

    dtype = Bs[0].dtype
    P = torch.cat([w * B.double() for B, w in zip(Bs, weights)], dim=1)
    Q = torch.cat([A.double() for A in As], dim=0)
    Qp, Rp = torch.linalg.qr(P, mode="reduced")
    Qq, Rq = torch.linalg.qr(Q.T, mode="reduced")
    Uc, S, Vct = torch.linalg.svd(Rp @ Rq.T, full_matrices=False)
    U, Vt = Qp @ Uc, Vct @ Qq.T
    keep_n = int((S > 0).sum())
    return SVD(U[:, :keep_n].to(dtype), S[:keep_n].to(dtype), Vt[:keep_n].to(dtype))


def before_after(model: str, repeats: int) -> dict:
    """HLoRA's whole round, per module v0 (QR) and now (Gram) alternated; ``repeats`` passes."""
    from hlora.linalg import factored_svd
    from hlora.strategies.base import round_weights

    _, _, updates, shapes, _ = client_updates(model, "hlora")
    p = round_weights(updates)
    arms = {"v0 (QR, becb146)": factored_svd_v0, "now (Gram)": factored_svd}
    totals = {a: [] for a in arms}
    worst = 0.0
    for rep in range(repeats):
        secs = dict.fromkeys(arms, 0.0)
        for i, m in enumerate(shapes):
            fs = [u.lora[m] for u in updates]
            args = ([f.B for f in fs], [f.A for f in fs], [w * f.scale for f, w in zip(fs, p)])
            order = list(arms) if (i + rep) % 2 == 0 else list(arms)[::-1]
            out = {}
            for a in order:
                t0 = time.perf_counter()
                out[a] = arms[a](*args)
                secs[a] += time.perf_counter() - t0
            if rep == 0:
                x, y = out.values()
                worst = max(worst, float((x.S - y.S).abs().max() / x.S[0]),
                            float((x.truncate(8).dense() - y.truncate(8).dense()).abs().max()
                                  / x.truncate(8).dense().abs().max()))
        for a in arms:
            totals[a].append(secs[a])
        print("  pass", rep + 1, ", ".join(f"{a}: {s:.2f} s" for a, s in secs.items()), flush=True)
    return {"seconds": totals, "max_relative_difference": worst}


def dense_check(model: str, layers: int) -> dict:
    """FlexLoRA's public route on ``layers`` layers: dense sum_k p_k s_k B_k A_k, full SVD; vs factored."""
    from hlora.factors import Factor
    from hlora.strategies.hlora import aggregate_products

    shapes, ranks, g = round_inputs(model, layers)
    p = [1 / 20] * 20
    dense_s = factored_s = 0.0
    worst = 0.0
    base = peak_mb()
    for m, (d, k) in shapes.items():
        facs = [Factor(torch.randn(d, r, generator=g) * 0.01, torch.randn(r, k, generator=g) * 0.01, 16.0 / r)
                for r in ranks]
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
        print(f"  {m} {d}x{k}: dense so far {dense_s:.1f} s", flush=True)
    return {"layers": layers, "modules": len(shapes), "dense_seconds": dense_s, "factored_seconds": factored_s,
            "max_relative_difference": worst, "dense_extra_rss_mb": peak_mb() - base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama7b", choices=sorted(SHAPES))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--dense-layers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="passes of the HLoRA before/after (0: skip)")
    ap.add_argument("--error-rank", type=int, default=0, help="rank of FedEx-LoRA's error term before the round")
    ap.add_argument("--robust", default="", help="robust rules to time on the HLoRA round, e.g. krum,multikrum,normclip")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rule", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(args.model, args.one, args.error_rank)))
        return
    if args.rule:
        print(json.dumps(robust_one(args.model, args.rule, args.dense_layers)))
        return
    if args.part == "before_after":
        print(json.dumps(before_after(args.model, args.repeats)))
        return
    if args.part == "dense":
        print(json.dumps(dense_check(args.model, args.dense_layers)))
        return

    def sub(*extra: str) -> dict:
        cmd = [sys.executable, __file__, "--model", args.model, *extra]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        lines = out.stdout.strip().splitlines()
        for line in lines[:-1]:
            print(line)
        return json.loads(lines[-1])

    print(f"{args.model}, torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads", flush=True)
    rows = []
    for name in filter(None, args.strategies.split(",")):
        row = sub("--one", name, "--error-rank", str(args.error_rank))
        rows.append(row)
        error = " error term rank {} -> {}".format(*row["error_rank"]) if "error_rank" in row else ""
        print(f"{name:10s} {cost(row)}  ({row['modules']} modules){error}", flush=True)
    robust = []
    for rule in filter(None, args.robust.split(",")):
        row = sub("--rule", rule, "--dense-layers", str(args.dense_layers))
        robust.append(row)
        check = (f"; dense check on {row['dense_layers']} layer(s): factored {row['factored_layers_seconds']:.3f} s, "
                 f"dense {row['dense_layers_seconds']:.2f} s, max relative difference "
                 f"{row['max_relative_difference']:.1e}") if "dense_layers" in row else ""
        print(f"robust {rule:9s} {cost(row)}  rejected {row['rejected']}, clipped {row['clipped']}{check}", flush=True)
    ba = sub("--part", "before_after", "--repeats", str(args.repeats)) if args.repeats else None
    if ba:
        print("HLoRA round before/after (median of passes): "
              + ", ".join(f"{a} {sorted(v)[len(v) // 2]:.2f} s [{min(v):.2f}-{max(v):.2f}]" for a, v in ba["seconds"].items())
              + f"; max relative difference {ba['max_relative_difference']:.1e}", flush=True)
    check = sub("--part", "dense", "--dense-layers", str(args.dense_layers)) if args.dense_layers else None
    if check:
        n_layers = SHAPES[args.model][0]
        print(f"dense route (FlexLoRA's code) on {check['layers']} layer(s): {check['dense_seconds']:.2f} s "
              f"(x{n_layers // check['layers']} layers = {check['dense_seconds'] * n_layers / check['layers']:.0f} s "
              f"estimated for the model; +{check['dense_extra_rss_mb']:.0f} MB RSS); factored: "
              f"{check['factored_seconds']:.3f} s; max relative difference {check['max_relative_difference']:.2e}")
    result = {"model": args.model, "threads": args.threads or torch.get_num_threads(), "torch": torch.__version__,
              "error_rank": args.error_rank, "strategies": rows, "robust": robust, "before_after": ba, "dense_check": check}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
