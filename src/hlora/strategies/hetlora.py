"""HetLoRA (Cho et al., 2024): zero-pad every client to the largest rank, average, truncate back.

Server rule, per module, global factors of the largest rank R (at scaling 1):

    B = sum_k w_k [B_k, 0],   A = sum_k w_k [s_k A_k; 0]      (zero-padded to R)
    client k receives B[:, :r_k] and A[:r_k] / s_k.

Weights: w_k = p_k = n_k / n by default; with ``norm_weights`` (Cho et al.'s sparsity-weighted
aggregation) w_k = ||s_k B_k A_k||_F / sum_j ||s_j B_j A_j||_F, so clients whose update carries more
energy count more. ||B A||_F^2 = trace((B^T B)(A A^T)) is computed without the dense product.
"""

from __future__ import annotations

import torch

from hlora.factors import Factor
from hlora.strategies.base import ClientSpec, GlobalState, Update, register
from hlora.strategies.fedit import FedIT


def product_norm(f: Factor) -> float:
    """||s B A||_F from the r x r Gram matrices, without forming B A."""
    gram = (f.B.T @ f.B) * (f.A @ f.A.T).T
    return abs(f.scale) * float(gram.sum().clamp_min(0).sqrt())


def norm_weights(factors: list[Factor]) -> list[float]:
    """w_k = ||s_k B_k A_k||_F / sum_j ||s_j B_j A_j||_F (uniform when every update is zero)."""
    norms = [product_norm(f) for f in factors]
    total = sum(norms)
    return [1 / len(norms)] * len(norms) if total == 0 else [n / total for n in norms]


@register
class HetLoRA(FedIT):
    name = "hetlora"

    def __init__(self, norm_weights: bool = False) -> None:
        self.norm_weights = bool(norm_weights)

    def check(self, clients: list[ClientSpec]) -> None:
        """Any mix of ranks."""

    def weights(self, state: GlobalState, updates: list[Update]) -> dict[str, list[float]]:
        if not self.norm_weights:
            return super().weights(state, updates)
        return {m: norm_weights([u.lora[m] for u in updates]) for m in state.lora}
