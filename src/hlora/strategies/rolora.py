"""RoLoRA (Chen et al., 2025): train B and A by turns; with the other factor shared and frozen, the
average is exact.

Server rule, per module (global factors at scaling 1, R the largest rank, [.] zero-padding to R):

    rounds 1, 3, 5, ...:  A frozen, clients train B:    B' = sum_k p_k [s_k B_k, 0],     A' = A
    rounds 2, 4, 6, ...:  B frozen, clients train A:    A' = sum_k p_k [s_k A_k; 0],     B' = B

Client k receives B[:, :r_k] and A[:r_k], the trained factor divided by s_k. The update is linear in the
trained factor, so the average of the factors is the average of the clients' updates:

    B' A' = sum_k p_k s_k B_k A[:r_k]   (odd rounds),     B' A' = sum_k p_k s_k B[:, :r_k] A_k   (even).

Round 1 trains B: LoRA starts at B = 0, against which A has no gradient (the first round of FFA-LoRA).

Mixed ranks: zero-padded as HetLoRA and FFA-LoRA, and the identity above still holds (each client's
update uses only the leading r_k ranks of the frozen factor); a rank that no client of the round holds
gets no weight in the average. A rank left with B's column zero carries nothing; its row of A is reset
to the shared seeded initialisation (the function is unchanged), so that it trains again in a B round.

Upload: the trained factor and the head (half of LoRA's factors). Download: both factors at rank r_k and
the head (a client that took part in the previous round already holds the frozen one; like every method
here, the count assumes a client holds nothing).
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
    fresh_ranks,
    register,
    round_weights,
)
from hlora.strategies.ffa import average_B


def trains_B(state: GlobalState) -> bool:
    """The round after ``state`` is odd (1, 3, ...): B trains, A is frozen."""
    return state.round % 2 == 0


def average_A(factors: list[Factor], weights: list[float], rank: int) -> torch.Tensor:
    """A = sum_k w_k [s_k A_k; 0] (zero-padded to ``rank``): FFA-LoRA's average of B on the transposed
    factors (B A)^T = A^T B^T."""
    return average_B([Factor(f.A.T, f.B.T, f.scale) for f in factors], weights, rank).T


@register
class RoLoRA(Strategy):
    name = "rolora"

    def dispatch(self, state: GlobalState, client: ClientSpec, rng: torch.Generator) -> Payload:
        b_round = trains_B(state)
        lora = {}
        for m, g in state.lora.items():
            r, s = client.ranks[m], client.scale(m)
            lora[m] = Factor(g.B[:, :r] / s, g.A[:r], s) if b_round else Factor(g.B[:, :r], g.A[:r] / s, s)
        info = {"trains": "B" if b_round else "A"}
        return Payload(lora=lora, head=state.head, train_A=not b_round, train_B=b_round, info=info)

    def aggregate(self, state: GlobalState, updates: list[Update]) -> GlobalState:
        p = round_weights(updates)
        b_round = trains_B(state)
        lora = {}
        for m, g in state.lora.items():
            fs = [u.lora[m] for u in updates]
            new = Factor(average_B(fs, p, g.rank), g.A) if b_round else Factor(g.B, average_A(fs, p, g.rank))
            lora[m] = fresh_ranks(new, state.init[m].A)
        return GlobalState(lora, average_heads(updates, p), state.init, state.round + 1)

    def uplink_bytes(self, update: Update) -> int:
        """The trained factor and the head."""
        trained = [f.B if update.info["trains"] == "B" else f.A for f in update.lora.values()]
        return tensor_bytes(*trained, *update.head.values())
