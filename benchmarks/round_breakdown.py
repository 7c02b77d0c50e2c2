"""Where a round's time goes, from a run's metrics.jsonl: client training, aggregation, evaluation, rest.

    python benchmarks/round_breakdown.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def breakdown(run_dir: Path) -> dict[str, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    total = sum(r["seconds"] for r in rows)
    parts = {k: sum(r[f"seconds_{k}"] for r in rows) for k in ("train", "aggregate", "eval")}
    parts["everything else"] = total - sum(parts.values())
    return {"rounds": len(rows), "seconds_per_round": total / len(rows),
            **{f"{k} %": 100 * v / total for k, v in parts.items()}}


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        b = breakdown(Path(arg))
        print(f"{arg}: {b['rounds']} rounds, {b['seconds_per_round']:.1f} s/round; "
              + ", ".join(f"{k} {v:.1f}" for k, v in b.items() if k.endswith("%")))
