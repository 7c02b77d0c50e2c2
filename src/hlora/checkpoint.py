"""Atomic checkpoints of the server state, so a killed run resumes exactly where it stopped.

A checkpoint holds the global state (strategy values per module, head, shared init), the round
number, the client sampler's RNG state, the client ranks and partition, and the metrics so far.
It is written to a temporary file and renamed over the old one: a crash never leaves half a file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from hlora.factors import Factor
from hlora.linalg import SVD
from hlora.strategies import GlobalState

CHECKPOINT = "checkpoint.pt"


def _pack(value: Any) -> Any:
    if isinstance(value, Factor):
        return {"__factor__": True, "B": value.B, "A": value.A, "scale": value.scale}
    if isinstance(value, SVD):
        return {"__svd__": True, "U": value.U, "S": value.S, "Vt": value.Vt}
    if isinstance(value, dict):
        return {k: _pack(v) for k, v in value.items()}
    return value


def _unpack(value: Any) -> Any:
    if isinstance(value, dict):
        if value.get("__factor__"):
            return Factor(value["B"], value["A"], value["scale"])
        if value.get("__svd__"):
            return SVD(value["U"], value["S"], value["Vt"])
        return {k: _unpack(v) for k, v in value.items()}
    return value


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, flush it to disk, then rename it to ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(out: Path, state: GlobalState, **extra: Any) -> None:
    payload = {
        "state": {
            "lora": _pack(state.lora),
            "head": state.head,
            "init": _pack(state.init),
            "round": state.round,
            "extra": _pack(state.extra),
        },
        **extra,
    }
    atomic_write(out / CHECKPOINT, lambda p: torch.save(payload, p))


def load_checkpoint(out: Path) -> tuple[GlobalState, dict[str, Any]]:
    payload = torch.load(out / CHECKPOINT, weights_only=True)
    s = payload.pop("state")
    state = GlobalState(_unpack(s["lora"]), s["head"], _unpack(s["init"]), s["round"], _unpack(s["extra"]))
    return state, payload
