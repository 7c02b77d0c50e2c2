"""Where a round's time goes, from a run's metrics.jsonl: client training, aggregation, evaluation, rest.

    python benchmarks/round_breakdown.py RUN_DIR[:FIRST-LAST] [RUN_DIR[:FIRST-LAST] ...]

``:FIRST-LAST`` keeps those rounds only (say, the rounds that ran on an idle machine).

``seconds`` of a round runs from its start to the end of its metrics row (dispatch, training,
aggregation, evaluation, the row's energy statistics); the checkpoint written after the row is not in
it, so it is measured here: the run's own ``checkpoint.pt`` is loaded and saved again (atomically, with
fsync, as the run does) five times into a temporary directory, and its median time is added to the rest.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def checkpoint_seconds(run_dir: Path, repeats: int = 5) -> float | None:
    from hlora.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint

    if not (run_dir / CHECKPOINT).exists():
        return None
    state, extra = load_checkpoint(run_dir)
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            t0 = time.perf_counter()
            save_checkpoint(Path(tmp), state, **extra)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def breakdown(run_dir: Path, first: int = 1, last: int | None = None) -> dict[str, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r["round"] >= first and (last is None or r["round"] <= last)]
    if not rows:
        raise SystemExit(f"{run_dir}: no rounds in {first}-{last}")
    ckpt = checkpoint_seconds(run_dir) or 0.0
    total = sum(r["seconds"] for r in rows) + ckpt * len(rows)
    parts = {k: sum(r[f"seconds_{k}"] for r in rows) for k in ("train", "aggregate", "eval")}
    parts["checkpoint"] = ckpt * len(rows)
    parts["everything else"] = total - sum(parts.values())
    return {"rounds": len(rows), "seconds_per_round": total / len(rows), "checkpoint_seconds": ckpt,
            **{f"{k} s/round": v / len(rows) for k, v in parts.items()},
            **{f"{k} %": 100 * v / total for k, v in parts.items()}}


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        path, _, span = arg.partition(":")
        first, _, last = span.partition("-")
        b = breakdown(Path(path), int(first or 1), int(last) if last else None)
        parts = [k[: -len(" s/round")] for k in b if k.endswith(" s/round")]
        print(f"{arg}: {b['rounds']} rounds, {b['seconds_per_round']:.1f} s/round; "
              + ", ".join(f"{k} {b[k + ' s/round']:.2f} s ({b[k + ' %']:.1f}%)" for k in parts))
