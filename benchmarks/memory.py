"""Peak resident memory of a simulation: 100 clients against 10, the same run otherwise.

    python benchmarks/memory.py [--rounds 1] [--per-round 10] [--local-epochs 1] [--out FILE.json]

Each run is a fresh ``hlora run`` process (one frozen base model, adapters swapped per client); its
peak RSS is read from the kernel when it exits (``wait4``). Runs: 10 clients and 100 clients with
``--per-round`` clients a round (the same number, so only the number of clients differs), and 100
clients with 20 a round (the default run). With one base model in memory the 100-client run should
need at most the extra clients' adapters more (printed as the bound), not more models.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def peak_rss_mb(args: list[str]) -> tuple[float, float]:
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child becomes the run; its own peak RSS is reported by wait4
        os.execvp(sys.executable, [sys.executable, "-m", "hlora.cli", "run", *args])
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"run failed: {' '.join(args)}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0


def adapter_mb(rank: int = 8) -> float:
    """One client's adapter (rank 8, the default targets of MiniLM-L6), float32."""
    from hlora.model import FederatedModel, load_classifier

    fm = FederatedModel(load_classifier("minilm", 2, seed=0)[0])
    return sum(rank * (d + k) * 4 for d, k in fm.shapes.values()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for clients, per_round in ((10, args.per_round), (100, args.per_round), (100, 20)):
            key = f"{clients} clients, {per_round} per round"
            run_args = ["--clients", str(clients), "--per-round", str(per_round), "--rounds", str(args.rounds),
                        "--local-epochs", str(args.local_epochs), "--out", f"{tmp}/c{clients}-{per_round}"]
            mb, seconds = peak_rss_mb(run_args)
            rows[key] = {"clients": clients, "per_round": per_round, "peak_rss_mb": mb, "seconds": seconds}
            print(f"{key}: peak RSS {mb:7.0f} MB ({seconds:.0f} s)", flush=True)
    a, b = rows[f"10 clients, {args.per_round} per round"], rows[f"100 clients, {args.per_round} per round"]
    bound = 90 * adapter_mb()
    print(f"100 vs 10 clients ({args.per_round} per round): {b['peak_rss_mb'] - a['peak_rss_mb']:+.0f} MB; "
          f"90 extra rank-8 adapters would be {bound:.1f} MB")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"rounds": args.rounds, "local_epochs": args.local_epochs, "runs": rows,
                       "extra_adapters_mb": bound}, fh, indent=2)


if __name__ == "__main__":
    main()
