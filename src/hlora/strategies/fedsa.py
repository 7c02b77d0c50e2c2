"""FedSA-LoRA (Guo et al., ICLR 2025, "Selective Aggregation for Low-Rank Adaptation in Federated
Learning"): both factors train locally; only A is shared and averaged, each client keeps its own B.

A learns what the clients share, B what is their own. The result is one model per client, k's model
W0 + s_k B_k A[:r_k] / s_k = W0 + B_k A[:r_k], not one global model.

Server rule, per module (global A of the largest rank R at scaling 1, p_k = n_k / n over the round):

    A'[i] = sum_{k: r_k > i} p_k s_k A_k[i]  /  sum_{k: r_k > i} p_k        (row i = 0 .. R-1)
    A'[i] = A[i]                                   when no client of the round holds rank i
    client k receives A'[:r_k] / s_k, and trains it with its own B_k from its last round
    (a client never sampled before starts from the global initial B = 0, LoRA's own initialisation).

With equal ranks and alphas this is the paper's A = sum_k p_k A_k (the scalings cancel). Mixed ranks:
zero-padded as HetLoRA, but each row of A is the average over the clients that hold it (weights
renormalised per row) rather than shrunk by the clients that do not; a client's B is tuned to its rows of
A, and a row that shrank every round a few clients skip it would pull the update of those that hold it
towards zero. Nothing is refused: any mix of ranks and alphas.

The head (classifier): personal by default, as in the paper's code (FederatedScope's
``personalization.local_param: ['lora_B', 'classifier']``); with ``share_head`` it is averaged, head =
sum_k p_k head_k, as the other strategies do.

Bytes: only A travels, down (A'[:r_k]) and up (A_k), plus the head when it is shared. B (and a personal
head) never leave the client: the update the server receives carries B (and the head) as it was sent.

Checks: the server's checks of a client's change (the update-norm outliers, ``--robust``) are stated on
the product s B A, which this server cannot form (it sees A, with B as it was sent): the norm check finds
no change to compare, and ``--robust`` is refused for fedsa (see ``engine.simulation.check_strategy``).

Client state (kept by the engine, :mod:`hlora.client_state`): B_k per module and, unshared, the head.
In float32 that is sum_m d_m r_k * 4 bytes a client: MiniLM (6 layers x query, value, d = 384) at rank 8,
12 * 384 * 8 * 4 = 147,456 B, plus the 384 x 2 + 2 head (3,080 B): 147 KiB a client, 14.4 MiB for 100
clients. At 7B shapes (d = k = 4096, 32 layers x q, v, rank 8): 32 * 2 * 4096 * 8 * 4 = 8,388,608 B =
8 MiB a client, 800 MiB for 100 clients.

The "global" model reported on the dev set (``accuracy``) and exported is the mean of the clients'
models, weighted by their training examples n_k over every client (a never-sampled one: B = 0 and the
initial head): B_bar = sum_k w_k [B_k, 0], W0 + B_bar A', head_bar = sum_k w_k head_k. The update is
linear in B given the shared A, so this is exactly the mean of the personal updates. The server cannot
form it (it never sees B); the simulation can, for comparability with the other strategies.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hlora.factors import Factor, tensor_bytes
from hlora.strategies.base import (
    ClientSpec,
    GlobalState,
    Payload,
    Strategy,
    StrategyError,
    Update,
    average_heads,
    register,
    round_weights,
    zero_pad,
)


def average_A_rows(factors: list[Factor], weights: list[float], previous: Tensor) -> Tensor:
    """A[i] = sum_{k: r_k > i} w_k s_k A_k[i] / sum_{k: r_k > i} w_k; a row no factor holds keeps ``previous``."""
    R = previous.shape[0]
    num = sum(w * zero_pad(f.scale * f.A, R, dim=0) for f, w in zip(factors, weights))
    den = sum(w * zero_pad(torch.ones(f.rank, dtype=num.dtype), R, dim=0) for f, w in zip(factors, weights))
    held = den > 0
    out = previous.to(num.dtype).clone()
    out[held] = num[held] / den[held, None]
    return out


@register
class FedSA(Strategy):
    name = "fedsa"
    personal = True

    def __init__(self, share_head: bool = False) -> None:
        self.share_head = bool(share_head)

    def check(self, clients: list[ClientSpec]) -> None:
        """Any mix of ranks and alphas."""

    def dispatch(self, state: GlobalState, client: ClientSpec, rng: torch.Generator) -> Payload:
        lora = {}
        for m, g in state.lora.items():
            r, s = client.ranks[m], client.scale(m)
            lora[m] = Factor(state.init[m].B[:, :r], g.A[:r] / s, s)
        return Payload(lora=lora, head=state.head)

    def aggregate(self, state: GlobalState, updates: list[Update]) -> GlobalState:
        p = round_weights(updates)
        lora = {
            m: Factor(g.B, average_A_rows([u.lora[m] for u in updates], p, g.A), 1.0)
            for m, g in state.lora.items()
        }
        head = average_heads(updates, p) if self.share_head else state.head
        return GlobalState(lora, head, state.init, state.round + 1, dict(state.extra))

    # the client's side: B (and an unshared head) stay on the client

    def personalise(self, payload: Payload, kept: dict[str, Any] | None) -> Payload:
        """The received A with the client's own B (and, unshared, its own head) from its last round."""
        if not kept:
            return payload
        lora = {}
        for m, f in payload.lora.items():
            B = kept["B"][m]
            if B.shape != f.B.shape:
                raise StrategyError(f"client's kept B at {m} has shape {tuple(B.shape)}, the round's rank "
                                    f"needs {tuple(f.B.shape)}")
            lora[m] = Factor(B, f.A, f.scale)
        head = payload.head if self.share_head else kept["head"]
        return Payload(lora=lora, head=head, frozen=payload.frozen, train_A=payload.train_A,
                       train_B=payload.train_B, info=dict(payload.info), tail_penalty=payload.tail_penalty)

    def keep(self, update: Update) -> dict[str, Any]:
        return {"B": {m: f.B for m, f in update.lora.items()}, "head": {} if self.share_head else update.head}

    def share(self, update: Update, sent: Payload) -> Update:
        """A (and the shared head); B and a personal head as they were sent."""
        lora = {m: Factor(sent.lora[m].B, f.A, f.scale) for m, f in update.lora.items()}
        head = update.head if self.share_head else sent.head
        return Update(update.client, lora, head, update.num_examples, dict(update.info), update.train_loss)

    def downlink_bytes(self, state: GlobalState, payload: Payload) -> int:
        return tensor_bytes(*(f.A for f in payload.lora.values()), *self._head(payload.head))

    def uplink_bytes(self, update: Update) -> int:
        return tensor_bytes(*(f.A for f in update.lora.values()), *self._head(update.head))

    def _head(self, head: dict[str, Tensor]) -> list[Tensor]:
        return list(head.values()) if self.share_head else []

    # the personalised models, for evaluation (the server never forms them)

    def personal_model(self, state: GlobalState, client: ClientSpec, kept: dict[str, Any] | None) -> Payload:
        """Client k's model: the global A'[:r_k] / s_k with its own B_k (and head)."""
        return self.personalise(self.dispatch(state, client, torch.Generator()), kept)

    def mean_state(
        self, state: GlobalState, clients: list[ClientSpec], kept: dict[int, dict[str, Any]]
    ) -> GlobalState:
        """The mean of every client's model, weighted by n_k (see the module docstring), as a global state:
        B_bar = sum_k w_k [B_k, 0] (B_k = 0 for a client with nothing kept), A' unchanged; the head
        sum_k w_k head_k (the initial head for a client with nothing kept) unless it is shared."""
        total = sum(c.num_examples for c in clients)
        w = {c.id: c.num_examples / total for c in clients}
        lora = {}
        for m, g in state.lora.items():
            B = torch.zeros_like(g.B)
            for c in clients:
                if c.id in kept:
                    B = B + w[c.id] * zero_pad(kept[c.id]["B"][m].to(B.dtype), g.rank, dim=1)
            lora[m] = Factor(B, g.A, 1.0)
        head = state.head
        if not self.share_head:
            head = {n: sum(w[c.id] * (kept[c.id]["head"][n] if c.id in kept else t) for c in clients)
                    for n, t in state.head.items()}
        return GlobalState(lora, head, state.init, state.round, dict(state.extra))
