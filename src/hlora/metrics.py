"""Evaluation of the global model, and the run's metrics files (metrics.jsonl, summary.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hlora.data import Encoded
from hlora.factors import Adapter
from hlora.model import FederatedModel


def evaluate(
    fm: FederatedModel,
    adapter: Adapter,
    head: dict[str, torch.Tensor],
    dev: Encoded,
    batch_size: int,
    f1_label: int | None = None,
) -> dict[str, float]:
    """Accuracy, mean cross-entropy and (when ``f1_label`` is set) F1 of that class on ``dev``."""
    preds = predict_logits(fm, adapter, head, dev, batch_size)
    labels = dev.labels
    out = {
        "accuracy": float((preds.argmax(-1) == labels).float().mean()),
        "eval_loss": float(F.cross_entropy(preds, labels)),
    }
    if f1_label is not None:
        out["f1"] = f1_score(preds.argmax(-1), labels, f1_label)
    return out


def predict_logits(
    fm: FederatedModel, adapter: Adapter, head: dict[str, torch.Tensor], data: Encoded, batch_size: int
) -> torch.Tensor:
    """Logits of the model W0 + adapter (with ``head``) on every example, in order."""
    fm.install(adapter, head)
    fm.model.eval()
    order = sorted(range(len(data)), key=data.lengths.__getitem__)  # similar lengths: less padding
    logits = [None] * len(data)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = data.batch(idx)
                batch.pop("labels")
                for i, row in zip(idx, fm.model(**batch).logits.float()):
                    logits[i] = row
    finally:
        fm.clear()
    return torch.stack(logits)


def f1_score(pred: torch.Tensor, labels: torch.Tensor, positive: int) -> float:
    tp = int(((pred == positive) & (labels == positive)).sum())
    fp = int(((pred == positive) & (labels != positive)).sum())
    fn = int(((pred != positive) & (labels == positive)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


class MetricsLog:
    """Appends one JSON object per round to ``metrics.jsonl``; writes ``summary.json``."""

    def __init__(self, out: Path, rows: list[dict[str, Any]] | None = None) -> None:
        self.path = out / "metrics.jsonl"
        self.summary_path = out / "summary.json"
        self.rows: list[dict[str, Any]] = list(rows or [])
        if rows is not None:  # resuming: the file holds exactly the checkpointed rounds
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def summary(self, **extra: Any) -> dict[str, Any]:
        acc = [r["accuracy"] for r in self.rows]
        best = max(range(len(acc)), key=acc.__getitem__) if acc else None
        out = {
            "rounds": len(self.rows),
            "final_accuracy": acc[-1] if acc else math.nan,
            "best_accuracy": acc[best] if acc else math.nan,
            "best_round": self.rows[best]["round"] if acc else None,
            "uplink_bytes": sum(r["uplink_bytes"] for r in self.rows),
            "downlink_bytes": sum(r["downlink_bytes"] for r in self.rows),
        }
        if self.rows and "f1" in self.rows[-1]:
            out["final_f1"] = self.rows[-1]["f1"]
            out["best_f1"] = max(r["f1"] for r in self.rows)
        out.update(extra)
        self.summary_path.write_text(json.dumps(out, indent=2) + "\n")
        return out
