"""The strategy interface: what a client receives (dispatch) and how updates combine (aggregate).

A strategy is server-side math only. It sees tensors, ranks and example counts; never a model, a file
or a network. The embedded simulation and the Flower engine call the same methods.

Conventions (shared by every strategy):

* Client k has rank r_k (per module), LoRA scaling s_k = alpha_k / r_k and n_k training examples.
  The weight of its update in a round is p_k = n_k / sum_j n_j over the round's clients. ``server.py`` sets
  n_k = 1 (so p_k = 1/K) under the default ``--client-weights uniform``, n_k = the client's examples under
  ``examples`` (the papers').
* A client's :class:`~hlora.factors.Factor` carries its own scaling, so its effective update is
  ``f.scale * f.B @ f.A``. Global state is kept at scaling 1.
* ``global_adapter(state)`` is the update that is evaluated: the global model is W0 + sum of it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from hlora.factors import Adapter, Factor, tensor_bytes


class StrategyError(ValueError):
    """A strategy cannot run with the given clients or options (a user mistake, not a bug)."""


@dataclass
class ClientSpec:
    """What the server knows of a client: its ranks per module, LoRA alpha and data size."""

    id: int
    ranks: dict[str, int]
    alpha: float
    num_examples: int

    def scale(self, module: str) -> float:
        return self.alpha / self.ranks[module]


@dataclass
class Payload:
    """What one client receives for one round.

    ``lora`` holds the trainable factors (initial values, at the client's scaling); ``frozen`` an extra
    low-rank update that the client adds to its frozen weights for this round (Fed-PLoRA's unselected
    modules, FLoRA's merged global update); ``train_A`` False freezes A (FFA-LoRA, RoLoRA's B rounds),
    ``train_B`` False freezes B (RoLoRA's A rounds); ``tail_penalty`` regularises the last rank (HetLoRA's
    rank self-pruning).
    """

    lora: Adapter
    head: dict[str, Tensor]
    frozen: Adapter = field(default_factory=dict)
    train_A: bool = True
    train_B: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    #: lambda of a penalty lambda * sum_m ||s b_r a_r^T||_F on the last rank (HetLoRA's self-pruning)
    tail_penalty: float = 0.0


@dataclass
class Update:
    """What one client sends back after local training."""

    client: int
    lora: Adapter
    head: dict[str, Tensor]
    num_examples: int
    info: dict[str, Any] = field(default_factory=dict)
    train_loss: float = float("nan")


@dataclass
class GlobalState:
    """Server state between rounds. ``lora`` holds a strategy-specific value per module.

    ``init`` is the shared, seeded initialisation at the largest rank (B = 0, A random): it seeds a
    client's ranks that the global update cannot fill (round 1, or a global rank below r_k).
    """

    lora: dict[str, Any]
    head: dict[str, Tensor]
    init: Adapter
    round: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def round_weights(updates: list[Update]) -> list[float]:
    """p_k = n_k / sum_j n_j over the round's updates."""
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        raise StrategyError("the round's updates hold no training examples")
    return [u.num_examples / total for u in updates]


def average_heads(updates: list[Update], weights: list[float]) -> dict[str, Tensor]:
    """Fully trained (non-LoRA) modules: head = sum_k p_k head_k."""
    names = updates[0].head.keys()
    return {n: sum(w * u.head[n] for u, w in zip(updates, weights)) for n in names}


def pad_rank(f: Factor, r: int, init_A: Tensor) -> Factor:
    """Give ``f`` exactly rank r: truncate, or pad with B = 0 columns and rows of the shared init A.

    Padding keeps the function (the new columns of B are zero) and keeps the new ranks trainable (a
    zero B next to a random A is LoRA's own initialisation; zero on both sides would never train).
    """
    have = f.rank
    if have >= r:
        return Factor(f.B[:, :r], f.A[:r], f.scale)
    d = f.B.shape[0]
    B = torch.cat([f.B, f.B.new_zeros(d, r - have)], dim=1)
    A = torch.cat([f.A, init_A[have:r].to(f.A.dtype)], dim=0)
    return Factor(B, A, f.scale)


def fresh_ranks(f: Factor, init_A: Tensor, rows: Tensor | None = None) -> Factor:
    """Ranks whose column of B is zero carry no update: give them PEFT's fresh init, A = A0's row.

    The function is unchanged (those ranks contribute B[:, j] a_j = 0), and a client's untrained ranks
    start exactly as a new PEFT LoRA of its own scaling would (B = 0, A ~ the shared seeded init),
    whatever the global scaling convention. ``rows`` maps f's ranks to rows of ``init_A``.
    """
    dead = (f.B == 0).all(dim=0)
    if not bool(dead.any()):
        return f
    idx = torch.arange(f.rank) if rows is None else rows
    A = f.A.clone()
    A[dead] = init_A[idx[dead]].to(A.dtype)
    return Factor(f.B, A, f.scale)


def zero_pad(t: Tensor, r: int, dim: int) -> Tensor:
    """Zero-pad ``t`` along ``dim`` up to size r."""
    missing = r - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


class Strategy(ABC):
    """A federated LoRA method: dispatch (server -> client) and aggregate (clients -> server)."""

    name: ClassVar[str]
    #: the engine pools the round's sampled clients into one (centralized training)
    pools_clients: ClassVar[bool] = False
    #: the aggregate is linear in the clients' products s B A, of any rank (not in their factors)
    aggregates_products: ClassVar[bool] = False
    #: each client keeps part of its model between its rounds (FedSA-LoRA's B): the result is one model per
    #: client. The engine keeps what :meth:`keep` returns in a client-state store (:mod:`hlora.client_state`)
    #: and the client puts it back with :meth:`personalise`; the server sees only :meth:`share`.
    personal: ClassVar[bool] = False

    def personalise(self, payload: Payload, kept: dict[str, Any] | None) -> Payload:
        """The client's side: what it trains from, given what it kept from its last round (None: never
        sampled before). Default: the payload as received."""
        return payload

    def keep(self, update: Update) -> dict[str, Any]:
        """What a client keeps of its trained update until its next round (default: nothing)."""
        return {}

    def share(self, update: Update, sent: Payload) -> Update:
        """What a client sends back of its trained update (default: all of it)."""
        return update

    def personal_model(self, state: GlobalState, client: ClientSpec, kept: dict[str, Any] | None) -> Payload:
        """The model ``client`` is scored with on its held-out examples (``lora``, ``head``): a personalised
        strategy's own model of the client; a global strategy's global model, the one the dev set scores
        (``--personal-eval``: every client scores the same model on its own share)."""
        return Payload(self.global_adapter(state), state.head)

    def mean_state(self, state: GlobalState, clients: list[ClientSpec], kept: dict[int, dict[str, Any]]) -> GlobalState:
        """A personalised strategy: the clients' models as one global state (reported, exported)."""
        raise NotImplementedError(f"{self.name} is not personalised")

    def check(self, clients: list[ClientSpec]) -> None:
        """Refuse clients this method is not defined for (raises StrategyError)."""

    def init_state(self, init: Adapter, head: dict[str, Tensor]) -> GlobalState:
        """By default the global state is one factor per module at scaling 1, starting at ``init``."""
        return GlobalState(lora=dict(init), head=head, init=init)

    @abstractmethod
    def dispatch(self, state: GlobalState, client: ClientSpec, rng: torch.Generator) -> Payload: ...

    @abstractmethod
    def aggregate(self, state: GlobalState, updates: list[Update]) -> GlobalState: ...

    def global_adapter(self, state: GlobalState) -> Adapter:
        """The evaluated update; by default the global factors themselves."""
        return dict(state.lora)

    def downlink_bytes(self, state: GlobalState, payload: Payload) -> int:
        """Bytes sent to one client: its trainable and frozen factors and the head."""
        return _adapter_bytes(payload.lora) + _adapter_bytes(payload.frozen) + tensor_bytes(
            *payload.head.values()
        )

    def uplink_bytes(self, update: Update) -> int:
        """Bytes one client sends back: its factors and the head."""
        return _adapter_bytes(update.lora) + tensor_bytes(*update.head.values())


def _adapter_bytes(adapter: Adapter) -> int:
    return sum(tensor_bytes(f.B, f.A) for f in adapter.values())


REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy available by its ``name``."""
    REGISTRY[cls.name] = cls
    return cls
