"""Reject broken client updates before they reach the server math.

A client's update must answer the payload it was sent: the same modules, factors of the same shapes
(so the same rank), finite numbers, and an effective update whose norm is not far above the round's
others. One broken or hostile client must not poison the global model.
"""

from __future__ import annotations

import math
import statistics

import torch

from hlora.factors import Factor
from hlora.strategies import Payload, Update
from hlora.strategies.hetlora import product_norm


def update_problem(update: Update, payload: Payload) -> str | None:
    """Why ``update`` cannot be aggregated (it does not match ``payload`` or holds NaN/Inf), or None."""
    missing = sorted(set(payload.lora) - set(update.lora))
    if missing:
        return f"missing modules: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
    extra = sorted(set(update.lora) - set(payload.lora))
    if extra:
        return f"unexpected modules: {', '.join(extra[:3])}"
    for m, sent in payload.lora.items():
        got = update.lora[m]
        if got.B.shape != sent.B.shape or got.A.shape != sent.A.shape:
            return (f"wrong shape at {m}: B {tuple(got.B.shape)}, A {tuple(got.A.shape)} for rank {sent.rank} "
                    f"(expected B {tuple(sent.B.shape)}, A {tuple(sent.A.shape)})")
        if not (torch.isfinite(got.B).all() and torch.isfinite(got.A).all()):
            return f"NaN or Inf in the factors of {m}"
        if got.scale != sent.scale:
            return f"wrong LoRA scaling at {m}: {got.scale} (sent {sent.scale})"
    if not _same(update.info, payload.info):
        return "the update's metadata (e.g. Fed-PLoRA's module indices) differs from what was sent"
    for name, t in payload.head.items():
        if name not in update.head or update.head[name].shape != t.shape:
            return f"missing or misshapen head parameter {name}"
        if not torch.isfinite(update.head[name]).all():
            return f"NaN or Inf in the head parameter {name}"
    if update.num_examples < 1:
        return f"num_examples must be at least 1, got {update.num_examples}"
    return None


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def change_norm(update: Update, payload: Payload) -> float:
    """How far the client moved this round: sqrt(sum_m ||s B A - s0 B0 A0||_F^2), from the stacked
    factors [s B, -s0 B0] [A; A0], without forming a dense matrix."""
    total = 0.0
    for m, f in update.lora.items():
        f0 = payload.lora[m]
        stacked = Factor(torch.cat([f.scale * f.B, -f0.scale * f0.B], 1), torch.cat([f.A, f0.A], 0), 1.0)
        total += product_norm(stacked) ** 2
    return math.sqrt(total)


def norm_outliers(updates: list[Update], payloads: list[Payload], max_ratio: float) -> dict[int, str]:
    """Updates whose change this round exceeds ``max_ratio`` times the round's median: {index: reason}."""
    if max_ratio <= 0 or len(updates) < 3:
        return {}
    norms = [change_norm(u, p) for u, p in zip(updates, payloads)]
    median = statistics.median(norms)
    if median == 0:
        return {}
    return {
        i: f"update norm (change this round) {n:.3g} is {n / median:.1f}x the round's median {median:.3g} (bound {max_ratio:g}x)"
        for i, n in enumerate(norms)
        if n > max_ratio * median
    }
