"""FedIT (Zhang et al., 2024): naive FedAvg of the LoRA factors. The paper's "naive" row.

Server rule, per module, clients with equal rank r and scaling s, weights p_k = n_k / n:

    B = sum_k p_k B_k,    A = sum_k p_k A_k,    global update  s B A.

This is biased: s (sum_k p_k B_k)(sum_k p_k A_k) != sum_k p_k s B_k A_k, the average of the clients'
updates (the HLoRA paper's eq. 1). Defined for equal ranks only.
"""

from __future__ import annotations

import torch

from hlora.factors import Factor
from hlora.strategies.base import (
    ClientSpec,
    GlobalState,
    Payload,
    Strategy,
    StrategyError,
    Update,
    average_heads,
    fresh_ranks,
    register,
    round_weights,
    zero_pad,
)


def fedavg_factors(
    factors: list[Factor], weights: list[float], rank: int | None = None, previous: Factor | None = None
) -> Factor:
    """Average B and A separately (at scaling 1: A_k enters as s_k A_k), zero-padded to ``rank``.

        B = sum_k w_k [B_k, 0],   A = sum_k w_k [s_k A_k; 0]

    With equal ranks this is FedIT's average; with mixed ranks, HetLoRA's zero-padded one. A rank that
    no client of the round holds keeps its ``previous`` value (instead of collapsing to zero).
    """
    r = rank if rank is not None else max(f.rank for f in factors)
    B = sum(w * zero_pad(f.B, r, dim=1) for f, w in zip(factors, weights))
    A = sum(w * zero_pad(f.scale * f.A, r, dim=0) for f, w in zip(factors, weights))
    held = max(f.rank for f in factors)
    if previous is not None and held < r:
        B[:, held:], A[held:] = previous.B[:, held:r], previous.A[held:r]
    return Factor(B, A, 1.0)


@register
class FedIT(Strategy):
    """Naive FedAvg-LoRA: average A and B separately. Equal ranks (and alphas) only."""

    name = "fedit"

    def check(self, clients: list[ClientSpec]) -> None:
        ranks = {r for c in clients for r in c.ranks.values()}
        alphas = {c.alpha for c in clients}
        if len(ranks) > 1 or len(alphas) > 1:
            raise StrategyError(
                f"fedit averages A and B separately and is defined for equal ranks only; the clients have "
                f"ranks {min(ranks)}..{max(ranks)}: use --ranks N (e.g. --ranks 8) or a heterogeneous "
                "strategy such as hlora"
            )

    def dispatch(self, state: GlobalState, client: ClientSpec, rng: torch.Generator) -> Payload:
        lora = {}
        for m, g in state.lora.items():
            r = client.ranks[m]
            lora[m] = fresh_ranks(Factor(g.B[:, :r], g.A[:r], 1.0).with_scale(client.scale(m)), state.init[m].A)
        return Payload(lora=lora, head=state.head)

    def aggregate(self, state: GlobalState, updates: list[Update]) -> GlobalState:
        p = self.weights(state, updates)
        lora = {}
        for m, g in state.lora.items():
            lora[m] = fedavg_factors([u.lora[m] for u in updates], p[m], rank=g.rank, previous=g)
        return GlobalState(lora, average_heads(updates, round_weights(updates)), state.init, state.round + 1)

    def weights(self, state: GlobalState, updates: list[Update]) -> dict[str, list[float]]:
        """Aggregation weights per module: p_k = n_k / n."""
        p = round_weights(updates)
        return {m: p for m in state.lora}
