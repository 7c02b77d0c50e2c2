"""Server optimizers around any strategy's aggregate (FedOpt, Reddi et al. 2021; Flower's FedAvgM,
FedAdam, FedYogi).

``avg`` is the strategy's own rule, untouched. The others treat the round's change as a pseudo-gradient
and step the global state with it.

**Factor-space strategies** (fedit, hetlora, ffa, fedplora, rolora, lorafair) and **the head** of every
strategy: for each global tensor x (a factor B or A at scaling 1, a head weight) with the strategy's
aggregate x_agg,

    Delta = x_agg - x
    avgm:  m = beta m + Delta;                                   x <- x + eta m
    adam:  m = b1 m + (1 - b1) Delta;  v = b2 v + (1 - b2) Delta^2;              x <- x + eta m / (sqrt v + tau)
    yogi:  m = b1 m + (1 - b1) Delta;  v = v - (1 - b2) Delta^2 sign(v - Delta^2); x <- x + eta m / (sqrt v + tau)

**Product-space strategies** (hlora, flexlora) keep the global update G (a thin SVD per module) and step
it with the clients' own changes, never with (aggregate - G):

    D_t = sum_k p_k (s_k B_k A_k - s_k B0_k A0_k)      (B0_k, A0_k: what client k received)
    m_t = trunc_c(beta m_{t-1} + D_t),   G_t = trunc_c(G_{t-1} + eta m_t)

all as factored SVDs of stacked factors (``linalg.factored_svd``), truncated to the rank cap c
(``server_rank``). Why not (HLoRA_t - G_{t-1}): HLoRA's average drops the part of G above each client's
rank (no client held it), and momentum would treat that drop as a gradient. With eta = 1, beta = 0 and
no cap this rule differs from HLoRA's by exactly that part, which it keeps:

    G_t - HLoRA_t = sum_k p_k (G_{t-1} - trunc_{r_k} G_{t-1}).

Adam and Yogi are elementwise, so they have no low-rank form on G: they are refused for product-space
strategies (and so is every server optimizer for flora, whose merged update is already the exact sum,
for fedex, whose error term makes the global model the exact average for the factors its rule chose: a
step on the factors alone breaks that, and with the error term recomputed it would only move the split
between the two; and for centralized, which has no server step). For rolora the factor frozen in a
round has Delta = 0 and moves only by its momentum (not under DP, which releases only the trained
factor); for lorafair x_agg is the corrected B_bar + dB.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hlora.factors import Factor
from hlora.linalg import SVD, factored_svd
from hlora.strategies import GlobalState, Payload, Strategy, Update
from hlora.strategies.base import StrategyError, average_heads, round_weights

SERVER_OPTS = ("avg", "avgm", "adam", "yogi")
PRODUCT_SPACE = ("hlora", "flexlora")
NO_SERVER_OPT = ("flora", "fedex", "centralized")
KEY = "server_opt"


class ServerOptError(StrategyError):
    """A server optimizer that is not defined for the strategy or its options are out of range."""


@dataclass
class ServerOpt:
    """A server optimizer's settings. ``rank`` is the rank cap of product-space state."""

    name: str = "avg"
    lr: float = 1.0
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    tau: float = 1e-3
    rank: int = 64

    def check(self, strategy: str) -> "ServerOpt":
        if self.name not in SERVER_OPTS:
            raise ServerOptError(f"--server-opt must be one of {', '.join(SERVER_OPTS)}, got {self.name!r}")
        if self.lr <= 0:
            raise ServerOptError(f"--server-lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ServerOptError(f"--server-momentum must be in [0, 1), got {self.momentum}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ServerOptError(f"--server-betas takes two numbers in [0, 1), got {self.betas}")
        if self.tau <= 0:
            raise ServerOptError(f"--server-tau must be > 0, got {self.tau}")
        if self.rank < 1:
            raise ServerOptError(f"--server-rank must be at least 1, got {self.rank}")
        if self.name == "avg":
            if self.lr != 1.0 or self.momentum:
                raise ServerOptError("--server-lr and --server-momentum need --server-opt avgm, adam or yogi")
            return self
        if strategy in NO_SERVER_OPT:
            raise ServerOptError(f"--server-opt {self.name} is not defined for {strategy}; use avg")
        if strategy in PRODUCT_SPACE and self.name in ("adam", "yogi"):
            raise ServerOptError(
                f"--server-opt {self.name} is elementwise and has no low-rank form on {strategy}'s product-space "
                "update; use avgm (momentum on the factored update)"
            )
        return self

    def step(self, strategy: Strategy, state: GlobalState, updates: list[Update], sent: list[Payload]) -> GlobalState:
        """The new global state after a round: the strategy's rule, or a server optimizer's step."""
        if self.name == "avg":
            return strategy.aggregate(state, updates)
        moments = dict(state.extra.get(KEY, {}))
        if strategy.name in PRODUCT_SPACE:
            p = round_weights(updates)
            new = {}
            dropped = 0.0
            for m, G in state.lora.items():
                D = client_change(
                    [u.lora[m] for u in updates], [pay.lora[m] for pay in sent], p
                )
                mom, e1 = momentum_step(moments.get(("m", m)), D, self.momentum, self.rank)
                new[m], e2 = global_step(G, mom, self.lr, self.rank)
                moments[("m", m)] = mom
                dropped = max(dropped, e1, e2)
            head_target = average_heads(updates, p)
            after = GlobalState(new, state.head, state.init, state.round + 1, dict(state.extra))
            after.extra["server_energy_dropped"] = dropped
        else:
            after = strategy.aggregate(state, updates)
            after = dataclasses.replace(after, lora={
                m: self._factor_step(moments, m, state.lora[m], f) for m, f in after.lora.items()
            })
            head_target = after.head
        head = {n: self._tensor_step(moments, ("h", n), state.head[n], head_target[n]) for n in head_target}
        extra = {**after.extra, KEY: moments}
        return dataclasses.replace(after, head=head, extra=extra)

    def _factor_step(self, moments: dict, m: str, old: Any, new: Any) -> Any:
        if not isinstance(new, Factor) or not isinstance(old, Factor) or old.B.shape != new.B.shape \
                or old.A.shape != new.A.shape or old.scale != new.scale:
            return new  # a changed shape (a pruned rank) restarts that module's moments
        return Factor(self._tensor_step(moments, ("B", m), old.B, new.B),
                      self._tensor_step(moments, ("A", m), old.A, new.A), new.scale)

    def _tensor_step(self, moments: dict, key: tuple, x: Tensor, target: Tensor) -> Tensor:
        delta = target - x
        first = moments.get(("m",) + key)
        if first is None or first.shape != delta.shape:
            first = torch.zeros_like(delta)
        if self.name == "avgm":
            first = self.momentum * first + delta
            moments[("m",) + key] = first
            return x + self.lr * first
        b1, b2 = self.betas
        second = moments.get(("v",) + key)
        if second is None or second.shape != delta.shape:
            second = torch.zeros_like(delta)
        first = b1 * first + (1 - b1) * delta
        sq = delta * delta
        if self.name == "adam":
            second = b2 * second + (1 - b2) * sq
        else:  # yogi
            second = second - (1 - b2) * sq * torch.sign(second - sq)
        moments[("m",) + key], moments[("v",) + key] = first, second
        return x + self.lr * first / (second.sqrt() + self.tau)


def client_change(trained: list[Factor], received: list[Factor], weights: list[float]) -> SVD:
    """D = sum_k w_k (s_k B_k A_k - s0_k B0_k A0_k), as a thin SVD (factored, never dense)."""
    Bs = [f.B for f in trained] + [f.B for f in received]
    As = [f.A for f in trained] + [f.A for f in received]
    ws = [w * f.scale for f, w in zip(trained, weights)] + [-w * f.scale for f, w in zip(received, weights)]
    return factored_svd(Bs, As, ws)


def _combine(a: SVD | None, wa: float, b: SVD, wb: float, cap: int) -> tuple[SVD, float]:
    """trunc_cap(wa a + wb b) and the fraction of its energy (squared Frobenius norm) the cap drops."""
    terms = [(a, wa), (b, wb)] if a is not None and a.rank else [(b, wb)]
    terms = [(t, w) for t, w in terms if t.rank and w]
    if not terms:
        return b, 0.0
    full = factored_svd([t.U * t.S for t, _ in terms], [t.Vt for t, _ in terms], [w for _, w in terms])
    total = float((full.S.double() ** 2).sum())
    kept = full.truncate(cap)
    dropped = 0.0 if total == 0 else 1.0 - float((kept.S.double() ** 2).sum()) / total
    return kept, dropped


def momentum_step(previous: SVD | None, change: SVD, beta: float, cap: int) -> tuple[SVD, float]:
    """m_t = trunc_cap(beta m_{t-1} + D_t); also the energy fraction the cap dropped."""
    return _combine(previous, beta, change, 1.0, cap)


def global_step(G: SVD, direction: SVD, lr: float, cap: int) -> tuple[SVD, float]:
    """G_t = trunc_cap(G_{t-1} + eta m_t); also the energy fraction the cap dropped."""
    return _combine(G, 1.0, direction, lr, cap)
