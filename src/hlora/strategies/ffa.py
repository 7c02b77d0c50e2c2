"""FFA-LoRA (Sun et al., 2024): freeze A at a shared seeded initialisation, train and average B only.

Server rule, per module (A fixed, R the largest rank, global kept at scaling 1):

    B = sum_k p_k [s_k B_k, 0]          (zero-padded to R);   global update  B A_0
    client k receives B[:, :r_k] / s_k and trains it against its rows A_0[:r_k] (never changed).

With A frozen the update is linear in B, so averaging B is exactly averaging the clients' updates.
Only B travels: A_0 comes from the shared seed, and is bit-identical on every client and every round.
"""

from __future__ import annotations

import torch

from hlora.factors import Factor, tensor_bytes
from hlora.strategies.base import (
    ClientSpec,
    GlobalState,
    Payload,
    Strategy,
    Update,
    average_heads,
    register,
    round_weights,
    zero_pad,
)


def average_B(factors: list[Factor], weights: list[float], rank: int) -> torch.Tensor:
    """B = sum_k w_k [s_k B_k, 0] (zero-padded to ``rank``)."""
    return sum(w * zero_pad(f.scale * f.B, rank, dim=1) for f, w in zip(factors, weights))


@register
class FFALoRA(Strategy):
    name = "ffa"

    def dispatch(self, state: GlobalState, client: ClientSpec, rng: torch.Generator) -> Payload:
        lora = {}
        for m, g in state.lora.items():
            r, s = client.ranks[m], client.scale(m)
            lora[m] = Factor(g.B[:, :r] / s, state.init[m].A[:r], s)
        return Payload(lora=lora, head=state.head, train_A=False)

    def aggregate(self, state: GlobalState, updates: list[Update]) -> GlobalState:
        p = round_weights(updates)
        lora = {
            m: Factor(average_B([u.lora[m] for u in updates], p, g.rank), state.init[m].A, 1.0)
            for m, g in state.lora.items()
        }
        return GlobalState(lora, average_heads(updates, p), state.init, state.round + 1)

    def downlink_bytes(self, state: GlobalState, payload: Payload) -> int:
        return tensor_bytes(*(f.B for f in payload.lora.values()), *payload.head.values())

    def uplink_bytes(self, update: Update) -> int:
        return tensor_bytes(*(f.B for f in update.lora.values()), *update.head.values())
