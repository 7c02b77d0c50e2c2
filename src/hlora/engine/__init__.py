"""Engines drive rounds: the embedded in-process simulation, and Flower (:mod:`hlora.engine.flower`).

``run``, ``resume``, ``Reporter`` and ``RunResult`` come from :mod:`hlora.engine.simulation`, imported on
first use (so that the Flower ClientApp's thin path imports no torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hlora.engine.simulation import Reporter, RunResult, resume, run

__all__ = ["Reporter", "RunResult", "resume", "run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        value = getattr(importlib.import_module("hlora.engine.simulation"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hlora.engine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
