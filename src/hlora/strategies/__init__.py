"""Server rules, one module per method. ``get_strategy(name)`` builds one by name."""

from __future__ import annotations

from typing import Any

from hlora.strategies import (  # noqa: F401  (importing a module registers its strategy)
    centralized,
    fedex,
    fedit,
    fedplora,
    fedsa,
    ffa,
    flexlora,
    flora,
    hetlora,
    hlora,
    lorafair,
    rolora,
)
from hlora.strategies.base import (
    REGISTRY,
    ClientSpec,
    GlobalState,
    Payload,
    Strategy,
    StrategyError,
    Update,
)

__all__ = [
    "REGISTRY",
    "ClientSpec",
    "GlobalState",
    "Payload",
    "Strategy",
    "StrategyError",
    "Update",
    "get_strategy",
    "names",
]


def names() -> list[str]:
    return sorted(REGISTRY)


def get_strategy(name: str, **options: Any) -> Strategy:
    """Build the strategy registered under ``name`` with its options."""
    if name not in REGISTRY:
        raise StrategyError(f"unknown strategy {name!r}; choose one of: {', '.join(names())}")
    try:
        return REGISTRY[name](**options)
    except TypeError:
        raise StrategyError(
            f"strategy {name!r} does not take the option(s) {', '.join(sorted(options))}"
        ) from None
