"""Re-price the catch-up downloads of finished FLoRA / FedEx-LoRA cells (commit f5556f3).

    python benchmarks/reprice_catch_up.py [--module 384x384] CELL_DIR [CELL_DIR ...]

Until f5556f3, a client's catch-up (the stacks of the rounds it missed, or the merged update when that
is smaller) priced the merged update as its thin SVD factors, r (d + 1 + k) numbers a module, also past
rank d k / (d + k + 1), where the dense d x k matrix is cheaper (up to 2x at full rank). The cells of
the results grids ran before the fix, so their ``downlink_bytes`` are the old price. This script
re-prices them from their own ``metrics.jsonl``, without re-running anything:

1. A round's stacks are known from the row: FLoRA sends sum_k r_k ranks, FedEx-LoRA sum_k r_k + R (the
   new global factors) + R (the previous factors' tails, when a client of the round is below R), each
   rank (d + k) numbers on each module. The bytes per rank and the head's come from the uplink column
   (sum_k r_k ranks plus one head a client), checked on every row.
2. Which rounds a client missed follows from the rows' ``clients``.
3. A row's old download is sum_c (factors + min(stacks_c, X) + head) for one unknown X, the merged
   update's thin-SVD bytes at that round; the sum is increasing in X, so X is solved from the row, and
   with it each client's old catch-up.
4. The new price of a catch-up is at most min(old, the dense bytes of every module), and equal to it
   whenever every module's rank is on the same side of d k / (d + k + 1), i.e. except in the round or two
   where the merged ranks cross it.

A check of steps 1-2 on FLoRA, whose merged rank is known (the ranks sent so far, up to min(d, k), when
no direction cancels): the old price replayed from the stacks alone, compared with the recorded rows.

Every adapted module must have the shape ``--module`` (the MiniLM's query and value: 384 x 384), float32;
a cell whose rows all hold the same ranks (``--ranks 8``) cannot separate a rank's bytes from the head's
and is refused.

Prints one markdown row per cell: the old and the re-priced download total, in MB, and for FLoRA how
many rows the replay reproduces.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

FLOAT = 4  # the grids' adapters are float32


def stack_ranks(strategy: str, ranks: list[int], R: int) -> int:
    if strategy == "flora":
        return sum(ranks)
    return sum(ranks) + R + (R if min(ranks) < R else 0)  # fedex: the error terms of the round


def per_rank_and_head(rows: list[dict]) -> tuple[int, int]:
    """Bytes of one rank on every module and of one head, from two rows' uploads; checked on all rows."""
    seen = [(sum(r["ranks"]), r["uplink_bytes"], len(r["clients"])) for r in rows]
    r1, u1, n1 = seen[0]
    other = next(((r, u, n) for r, u, n in seen if r * n1 != r1 * n), None)
    if other is None:
        raise SystemExit("every round has the same ranks per client: "
                         "a rank's bytes and the head's cannot be told apart")
    r2, u2, n2 = other
    per_rank = (u1 * n2 - u2 * n1) // (r1 * n2 - r2 * n1)
    head = (u1 - r1 * per_rank) // n1
    for r in rows:
        if r["uplink_bytes"] != sum(r["ranks"]) * per_rank + len(r["clients"]) * head:
            raise SystemExit(f"round {r['round']}: the upload is not "
                             f"sum(ranks) x {per_rank} + clients x {head}")
    return per_rank, head


def solve(stacks: list[int], target: int) -> list[int]:
    """Each client's min(stacks_c, X), for the X that makes their sum ``target``."""
    if target == sum(stacks):
        return list(stacks)
    if target > sum(stacks):
        raise SystemExit(f"the recorded download ({target}) is more than "
                         f"every stack the clients missed ({sum(stacks)})")
    lo, hi = 0, max(stacks)
    while hi - lo > 1:  # integer bisection on X
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if sum(min(s, mid) for s in stacks) <= target else (lo, mid)
    out = [min(s, lo) for s in stacks]
    if sum(out) != target:
        raise SystemExit(f"no X gives the recorded download ({sum(out)} != {target})")
    return out


def reprice(cell: Path, d: int, k: int) -> tuple[float, float, int, str]:
    cfg = yaml.safe_load((cell / "config.yaml").read_text())
    strategy = cfg["strategy"]
    rows = [json.loads(line) for line in (cell / "metrics.jsonl").open()]
    per_rank, head = per_rank_and_head(rows)
    modules = per_rank // ((d + k) * FLOAT)
    if modules * (d + k) * FLOAT != per_rank:
        raise SystemExit(f"{cell}: {per_rank} bytes a rank is not a whole number of {d}x{k} modules")
    R = max(cfg["client_ranks"])  # the global factors' rank: the largest client rank
    factors = R * per_rank if strategy == "fedex" else 0  # FedEx also sends the global factors at rank R
    dense = modules * d * k * FLOAT
    stacked: dict[int, int] = {}
    synced: dict[int, int] = {}
    old = new = 0
    crossed = replayed = rank = 0
    for r in rows:
        stacks = [sum(b for rnd, b in stacked.items() if rnd > synced.get(c, 0)) for c in r["clients"]]
        fixed = len(stacks) * (factors + head)
        catch = solve(stacks, r["downlink_bytes"] - fixed)
        old += r["downlink_bytes"]
        new += fixed + sum(min(c, dense) for c in catch)
        crossed += any(c > dense for c in catch)
        thin_svd = modules * rank * (d + 1 + k) * FLOAT
        replayed += fixed + sum(min(s, thin_svd) for s in stacks) == r["downlink_bytes"]
        stacked[r["round"]] = stack_ranks(strategy, r["ranks"], R) * per_rank
        rank = min(rank + sum(r["ranks"]), d, k)
        for c in r["clients"]:
            synced[c] = r["round"] - 1
    check = f"{replayed}/{len(rows)}" if strategy == "flora" else "-"
    return old / 1e6, new / 1e6, crossed, check


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cells", nargs="+", type=Path)
    ap.add_argument("--module", default="384x384", help="d x k of an adapted module (MiniLM-L6: 384x384)")
    args = ap.parse_args()
    d, k = (int(x) for x in args.module.split("x"))
    print("| cell | download, old price (MB) | re-priced (MB) | ratio | rounds with a dense catch-up "
          "| rows the replay reproduces |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for cell in args.cells:
        old, new, crossed, check = reprice(cell, d, k)
        print(f"| {cell} | {old:,.1f} | {new:,.1f} | {old / new:.2f} | {crossed} | {check} |")


if __name__ == "__main__":
    main()
