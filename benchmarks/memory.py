"""Peak resident memory of a simulation: 100 clients against 10, the same rounds otherwise.

    python benchmarks/memory.py [--rounds 2] [--per-round 10] [--out FILE.json]

Each run is a fresh ``hlora run`` process (one frozen base model, adapters swapped per client); its
peak RSS is read from the kernel when it exits. With one base model in memory the difference between
the two should be about the size of the extra clients' state (their data indices), not of models.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for clients in (10, 100):
            run_args = ["--clients", str(clients), "--per-round", str(args.per_round), "--rounds", str(args.rounds),
                        "--out", f"{tmp}/c{clients}"]
            mb, seconds = peak_rss_mb(run_args)
            rows[clients] = {"peak_rss_mb": mb, "seconds": seconds}
            print(f"{clients:4d} clients: peak RSS {mb:7.0f} MB ({seconds:.0f} s)", flush=True)
    print(f"difference: {rows[100]['peak_rss_mb'] - rows[10]['peak_rss_mb']:+.0f} MB")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"rounds": args.rounds, "per_round": args.per_round, "runs": rows,
                       "maxrss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, fh, indent=2)


if __name__ == "__main__":
    main()
