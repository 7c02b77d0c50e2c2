"""Reject broken client updates before they reach the server math.

A client's update must answer the payload it was sent: the same modules, factors of the same shapes
(so the same rank), finite numbers, and an effective update whose norm is not far above the round's
others. One broken or hostile client must not poison the global model.
"""

from __future__ import annotations

import math
import statistics

import torch

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
        if not (torch.isfinite(got.B).all() and torch.isfinite(got.A).all()) or not math.isfinite(got.scale):
            return f"NaN or Inf in the factors of {m}"
    for name, t in payload.head.items():
        if name not in update.head or update.head[name].shape != t.shape:
            return f"missing or misshapen head parameter {name}"
        if not torch.isfinite(update.head[name]).all():
            return f"NaN or Inf in the head parameter {name}"
    if update.num_examples < 1:
        return f"num_examples must be at least 1, got {update.num_examples}"
    return None


def update_norm(update: Update) -> float:
    """sqrt(sum over modules of ||s B A||_F^2), without forming B A."""
    return math.sqrt(sum(product_norm(f) ** 2 for f in update.lora.values()))


def norm_outliers(updates: list[Update], max_ratio: float) -> dict[int, str]:
    """Updates whose norm exceeds ``max_ratio`` times the round's median norm: {index: reason}."""
    if max_ratio <= 0 or len(updates) < 3:
        return {}
    norms = [update_norm(u) for u in updates]
    median = statistics.median(norms)
    if median == 0:
        return {}
    return {
        i: f"update norm {n:.3g} is {n / median:.1f}x the round's median {median:.3g} (bound {max_ratio:g}x)"
        for i, n in enumerate(norms)
        if n > max_ratio * median
    }
