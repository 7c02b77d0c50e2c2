"""hlora: federated fine-tuning with LoRA adapters of different ranks on different clients.

The names below are imported on first use (PEP 562): ``import hlora.engine.flower.client_app`` (a Flower
ClientApp that forwards to a node worker) must not pay for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hlora.config import RunConfig, load_config
    from hlora.engine import run

__version__ = "0.1.0"
__all__ = ["RunConfig", "load_config", "run", "__version__"]

_LAZY = {"RunConfig": "hlora.config", "load_config": "hlora.config", "run": "hlora.engine"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hlora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
