"""Centralized LoRA: the upper-bound row. No federation, no aggregation.

Each round the engine pools the training data of the round's sampled clients into one client (same
examples, same number of steps as a federated round: --local-epochs passes over the pool, or with
--local-steps N, N times the number of sampled clients) and trains one LoRA of the largest rank on it,
continuing from the previous round. The server keeps that adapter as it is:

    dW_{t+1} = s B A   (the single learner's own update)

Nothing crosses a network, so both byte counts are zero.
"""

from __future__ import annotations

import torch

from hlora.strategies.base import (
    ClientSpec,
    GlobalState,
    Payload,
    Strategy,
    Update,
    fresh_ranks,
    pad_rank,
    register,
)


@register
class Centralized(Strategy):
    name = "centralized"
    pools_clients = True

    def dispatch(self, state: GlobalState, client: ClientSpec, rng: torch.Generator) -> Payload:
        lora = {
            m: fresh_ranks(pad_rank(f.with_scale(client.scale(m)), client.ranks[m], state.init[m].A), state.init[m].A)
            for m, f in state.lora.items()
        }
        return Payload(lora=lora, head=state.head)

    def aggregate(self, state: GlobalState, updates: list[Update]) -> GlobalState:
        if len(updates) != 1:
            raise ValueError("centralized training aggregates exactly one (pooled) update")
        (u,) = updates
        lora = {m: u.lora[m].with_scale(1.0) for m in state.lora}
        return GlobalState(lora, dict(u.head), state.init, state.round + 1)

    def downlink_bytes(self, state: GlobalState, payload: Payload) -> int:
        return 0

    def uplink_bytes(self, update: Update) -> int:
        return 0
