"""Numeric precision of the frozen base's compute: float32, or bfloat16 autocast on CPUs and GPUs that
support it.

``bf16`` runs the base model's matmuls under ``torch.autocast(device, dtype=torch.bfloat16)``; the LoRA
factors, the head's parameters, the optimizer state and the loss stay float32 (autocast changes the dtype
of compute, not of storage, and runs cross-entropy in float32). ``auto`` picks bf16 only where the
hardware supports it and a timing of a few training batches shows it faster; the choice is written
into the run's config, so a resumed run uses the same precision.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def precision_context(precision: str, device: str = "cpu"):
    """A context for the forward pass: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bf16_supported() -> bool:
    """Native bf16 compute: a CUDA device with bf16, or a CPU with AVX512-BF16/AMX (oneDNN's check)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def resolve_precision(precision: str, step: Callable[[str], None], repeats: int = 3) -> str:
    """``fp32``/``bf16`` as given; ``auto``: bf16 if supported and ``step("bf16")`` (a few training
    batches) is faster than ``step("fp32")`` by 10% or more, timed interleaved ``repeats`` times after a
    warm-up of each."""
    if precision != "auto":
        return precision
    if not bf16_supported():
        return "fp32"
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for mode in times:  # warm-up
        step(mode)
    for _ in range(repeats):
        for mode in times:
            t0 = time.perf_counter()
            step(mode)
            times[mode].append(time.perf_counter() - t0)
    return "bf16" if min(times["bf16"]) < 0.9 * min(times["fp32"]) else "fp32"
