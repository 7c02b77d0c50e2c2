"""Fed-PLoRA: R parallel rank-1 modules; each client trains r_i of them, folds in the rest.

The global adapter of a module is dW = sum_{j<R} b_j a_j^T (R = the largest rank, at scaling 1).
Each round client i draws r_i of the R modules at random, S_i. It starts from

    W_i = W0 + sum_{j not in S_i} b_j a_j^T      (the others, folded into its frozen weights)
    trainable: b_j, a_j for j in S_i, from their global values

so its starting model equals the global model exactly. It uploads only its picks, with their indices.
The server averages each module over the clients that trained it (weights n_i over those clients):

    b_j = sum_{i: j in S_i} n_i b_j^(i) / sum_{i: j in S_i} n_i,    a_j likewise (as s_i a_j^(i))

and a module nobody trained keeps its value. With every r_i = R, this is FedIT.
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


def select_modules(R: int, r: int, rng: torch.Generator) -> torch.Tensor:
    """r distinct module indices out of R, in increasing order."""
    return torch.randperm(R, generator=rng)[:r].sort().values


def split_modules(g: Factor, picks: torch.Tensor, scale: float) -> tuple[Factor, Factor]:
    """The selected modules at the client's scaling (trainable), and the rest at scaling 1 (frozen)."""
    rest = torch.ones(g.rank, dtype=torch.bool)
    rest[picks] = False
    return Factor(g.B[:, picks], g.A[picks] / scale, scale), Factor(g.B[:, rest], g.A[rest], 1.0)


def average_modules(
    g: Factor, factors: list[Factor], indices: list[torch.Tensor], weights: list[float]
) -> Factor:
    """Average each rank-1 module over the clients that trained it; untouched modules are kept."""
    B_sum, A_sum = torch.zeros_like(g.B), torch.zeros_like(g.A)
    w_sum = torch.zeros(g.rank, dtype=g.B.dtype)
    for f, idx, w in zip(factors, indices, weights):
        B_sum.index_add_(1, idx, w * f.B)
        A_sum.index_add_(0, idx, w * f.scale * f.A)
        w_sum.index_add_(0, idx, torch.full((len(idx),), w, dtype=g.B.dtype))
    trained = w_sum > 0
    B, A = g.B.clone(), g.A.clone()
    B[:, trained] = B_sum[:, trained] / w_sum[trained]
    A[trained] = A_sum[trained] / w_sum[trained, None]
    return Factor(B, A, 1.0)


@register
class FedPLoRA(Strategy):
    name = "fedplora"

    def dispatch(self, state: GlobalState, client: ClientSpec, rng: torch.Generator) -> Payload:
        lora, frozen, indices = {}, {}, {}
        for m, g in state.lora.items():
            indices[m] = select_modules(g.rank, client.ranks[m], rng)
            trainable, frozen[m] = split_modules(g, indices[m], client.scale(m))
            lora[m] = fresh_ranks(trainable, state.init[m].A, rows=indices[m])
        return Payload(lora=lora, head=state.head, frozen=frozen, info={"indices": indices})

    def aggregate(self, state: GlobalState, updates: list[Update]) -> GlobalState:
        p = round_weights(updates)
        lora = {
            m: average_modules(g, [u.lora[m] for u in updates], [u.info["indices"][m] for u in updates], p)
            for m, g in state.lora.items()
        }
        return GlobalState(lora, average_heads(updates, p), state.init, state.round + 1)

    def uplink_bytes(self, update: Update) -> int:
        """The picked modules, their indices and the head."""
        return super().uplink_bytes(update) + tensor_bytes(*update.info["indices"].values())
