"""Evaluation of the global model, and the run's metrics files (metrics.jsonl, dev_predictions.json,
summary.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hlora.data import Encoded, EncodedLM
from hlora.data.instruct import IGNORE, rouge_l, special_ids
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


def dev_predictions(
    fm: FederatedModel, adapter: Adapter, head: dict[str, torch.Tensor], dev: Encoded, batch_size: int
) -> dict[str, list[int]]:
    """The predicted and the gold label id of every dev example, in the dev set's order: what a paired
    bootstrap over dev examples needs (``hlora compare``'s table). The same logits as :func:`evaluate`'s, so
    the share of ``predicted == gold`` is the round's accuracy."""
    preds = predict_logits(fm, adapter, head, dev, batch_size).argmax(-1)
    return {"predicted": preds.tolist(), "gold": dev.labels.tolist()}


def count_correct(
    fm: FederatedModel, adapter: Adapter, head: dict[str, torch.Tensor], data: Encoded, batch_size: int
) -> int:
    """How many examples of ``data`` the model W0 + adapter (with ``head``) labels right (a personalised
    client's score on its held-out examples, in the simulation and on a Flower node)."""
    return int((predict_logits(fm, adapter, head, data, batch_size).argmax(-1) == data.labels).sum())


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
                with fm.autocast():
                    logits_batch = fm.model(**batch).logits.float()
                for i, row in zip(idx, logits_batch):
                    logits[i] = row
    finally:
        fm.clear()
    return torch.stack(logits)


def evaluate_lm(
    fm: FederatedModel,
    adapter: Adapter,
    dev: EncodedLM,
    batch_size: int,
    tokenizer,
    references: list[str],
    gen_samples: int,
    max_new_tokens: int,
) -> dict[str, float]:
    """Mean cross-entropy per response token on ``dev`` (``eval_loss``), ``perplexity`` = exp(eval_loss),
    and ``rouge_l``: ROUGE-L F1 of greedy generations for the first ``gen_samples`` dev examples against
    their references (0 turns generation off)."""
    fm.install(adapter, fm.head_state())
    fm.model.eval()
    total, count = 0.0, 0
    try:
        with torch.inference_mode():
            order = sorted(range(len(dev)), key=dev.lengths.__getitem__)
            for start in range(0, len(order), batch_size):
                batch = dev.batch(order[start : start + batch_size])
                labels = batch.pop("labels")
                with fm.autocast():
                    logits = fm.model(**batch).logits.float()
                target = labels[:, 1:]
                total += float(F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                    ignore_index=IGNORE, reduction="sum",
                ))
                count += int((target != IGNORE).sum())
            with fm.autocast():
                scores = [
                    rouge_l(generate(fm.model, tokenizer, dev.prompt(i), max_new_tokens), references[i])
                    for i in range(min(gen_samples, len(dev)))
                ]
    finally:
        fm.clear()
    loss = total / max(count, 1)
    out = {"eval_loss": loss, "perplexity": perplexity(loss)}
    if scores:
        out["rouge_l"] = sum(scores) / len(scores)
    return out


def perplexity(loss: float) -> float:
    """exp(``loss``), the loss a mean cross-entropy per token (capped at exp(50): an untrained model's
    perplexity stays finite)."""
    return math.exp(min(loss, 50.0))


def generate(model, tokenizer, prompt: torch.Tensor, max_new_tokens: int) -> str:
    """Greedy decoding from one prompt, up to EOS or ``max_new_tokens``; the new text only."""
    eos = special_ids(tokenizer)[1]
    out = model.generate(
        input_ids=prompt[None], attention_mask=torch.ones_like(prompt)[None], max_new_tokens=max_new_tokens,
        do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True).strip()


def f1_score(pred: torch.Tensor, labels: torch.Tensor, positive: int) -> float:
    tp = int(((pred == positive) & (labels == positive)).sum())
    fp = int(((pred == positive) & (labels != positive)).sum())
    fn = int(((pred != positive) & (labels == positive)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def score_key(rows: list[dict[str, Any]]) -> str:
    """The main metric of a run's rows: accuracy (classification), else eval_loss (a language model), else
    personal_accuracy (a personalised strategy on Flower: the server holds no model, the nodes score theirs)."""
    for key in ("accuracy", "eval_loss", "personal_accuracy"):
        if any(key in r for r in rows):
            return key
    return "accuracy"


def scored_rows(rows: list[dict[str, Any]], key: str | None = None) -> list[dict[str, Any]]:
    """The rows of evaluated rounds (``--eval-every`` leaves the others without scores)."""
    key = key or score_key(rows)
    return [r for r in rows if key in r]


PREDICTIONS = "dev_predictions.json"


def read_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``, one per finished round."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_predictions(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's ``dev_predictions.json`` (``round``, ``predicted``, ``gold``), or None when it has none (an LM
    run, or a run from before it was written)."""
    path = Path(run_dir) / PREDICTIONS
    return json.loads(path.read_text()) if path.is_file() else None


class MetricsLog:
    """Appends one JSON object per round to ``metrics.jsonl``; writes ``dev_predictions.json`` and
    ``summary.json``. A ``tracker`` (:class:`hlora.tracking.Tracking`) gets each new row and the summary
    too."""

    def __init__(self, out: Path, rows: list[dict[str, Any]] | None = None, tracker: Any = None) -> None:
        self.tracker = tracker
        self.path = out / "metrics.jsonl"
        self.summary_path = out / "summary.json"
        self.predictions_path = out / PREDICTIONS
        self.rows: list[dict[str, Any]] = list(rows or [])
        if rows is not None:  # resuming: the file holds exactly the checkpointed rounds
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tracker is not None:
            self.tracker.log_round(row, row["round"])

    def predictions(self, round: int, predicted: list[int], gold: list[int]) -> None:
        """``dev_predictions.json``: the predicted and gold label id of every dev example at ``round`` (one
        line, a few KB)."""
        saved = {"round": round, "predicted": predicted, "gold": gold}
        self.predictions_path.write_text(json.dumps(saved) + "\n")

    def summary(self, **extra: Any) -> dict[str, Any]:
        """Final and best value of the main metric (accuracy; eval_loss, lower is better, for an LM)."""
        key = score_key(self.rows)
        scored = scored_rows(self.rows, key)
        values = [r[key] for r in scored]
        pick = min if key == "eval_loss" else max
        best = pick(range(len(values)), key=values.__getitem__) if values else None
        out = {
            "rounds": len(self.rows),
            f"final_{key}": values[-1] if values else math.nan,
            f"best_{key}": values[best] if values else math.nan,
            "best_round": scored[best]["round"] if values else None,
            "uplink_bytes": sum(r["uplink_bytes"] for r in self.rows),
            "downlink_bytes": sum(r["downlink_bytes"] for r in self.rows),
        }
        for key in ("rouge_l", "perplexity"):  # an LM's (ROUGE-L only with --gen-samples above 0)
            if self.rows and key in self.rows[-1]:
                out[f"final_{key}"] = self.rows[-1][key]
        if self.rows and "f1" in self.rows[-1]:
            out["final_f1"] = self.rows[-1]["f1"]
            out["best_f1"] = max(r["f1"] for r in scored)
        out.update(extra)
        self.summary_path.write_text(json.dumps(out, indent=2) + "\n")
        if self.tracker is not None:
            self.tracker.log_summary(out)
        return out
