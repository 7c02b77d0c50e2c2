"""HLoRA: aggregate the products, re-decompose by truncated SVD, send each client its own rank.

Server rule, per adapted module, over the round's clients k with weights p_k = n_k / n:

    dW = sum_k p_k s_k B_k A_k = U S V^T                    (kept factored, never dense)

The global model is W0 + dW. Client k (rank r_k, scaling s_k) receives

    B = U_r,   A = S_r V_r^T / s_k,     so that  s_k B A = U_r S_r V_r^T,

the best rank-r_k approximation of dW (Eckart-Young). Naive FedAvg of A and B separately is biased
(mean(B) mean(A) != mean(B A)); the product sum is not, and it admits any mix of ranks.
"""

from __future__ import annotations

import torch

from hlora.factors import Adapter, Factor
from hlora.linalg import SVD, factored_svd
from hlora.strategies.base import (
    ClientSpec,
    GlobalState,
    Payload,
    Strategy,
    Update,
    average_heads,
    pad_rank,
    register,
    round_weights,
)


def aggregate_products(factors: list[Factor], weights: list[float]) -> SVD:
    """dW = sum_k w_k s_k B_k A_k as a thin SVD, via ``linalg.factored_svd`` of the stacked factors (its Gram
    route for float32 factors, QR for float64)."""
    return factored_svd(
        [f.B for f in factors], [f.A for f in factors], [w * f.scale for f, w in zip(factors, weights)]
    )


def hlora_split(svd: SVD, r: int, scale: float) -> Factor:
    """HLoRA's rank-r factors at LoRA scaling s: B = U_r, A = S_r V_r^T / s."""
    t = svd.truncate(r)
    return Factor(t.U, t.S[:, None] * t.Vt / scale, scale)


def empty_svd(f: Factor) -> SVD:
    """The rank-0 update of ``f``'s shape (no update yet)."""
    return SVD(f.B.new_zeros(f.B.shape[0], 0), f.B.new_zeros(0), f.A.new_zeros(0, f.A.shape[1]))


def svd_adapter(svd: SVD) -> Factor:
    """The whole update U S V^T as a factor at scaling 1."""
    return Factor(svd.U * svd.S, svd.Vt, 1.0)


@register
class HLoRA(Strategy):
    """Heterogeneous-rank LoRA with product aggregation and SVD re-decomposition."""

    name = "hlora"
    aggregates_products = True

    @staticmethod
    def split(svd: SVD, r: int, scale: float) -> Factor:
        return hlora_split(svd, r, scale)

    def init_state(self, init: Adapter, head: dict[str, torch.Tensor]) -> GlobalState:
        return GlobalState(lora={m: empty_svd(f) for m, f in init.items()}, head=head, init=init)

    def dispatch(self, state: GlobalState, client: ClientSpec, rng: torch.Generator) -> Payload:
        lora = {}
        for m, svd in state.lora.items():
            r, s = client.ranks[m], client.scale(m)
            lora[m] = pad_rank(self.split(svd, r, s), r, state.init[m].A)
        return Payload(lora=lora, head=state.head)

    def aggregate(self, state: GlobalState, updates: list[Update]) -> GlobalState:
        p = round_weights(updates)
        lora = {m: aggregate_products([u.lora[m] for u in updates], p) for m in state.lora}
        return GlobalState(lora, average_heads(updates, p), state.init, state.round + 1)

    def global_adapter(self, state: GlobalState) -> Adapter:
        return {m: svd_adapter(svd) for m, svd in state.lora.items()}
