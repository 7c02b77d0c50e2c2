"""HetLoRA (Cho et al., 2024): zero-pad every client to the largest rank, average, truncate back.

Server rule, per module, global factors of the largest rank R (at scaling 1):

    B = sum_k w_k [B_k, 0],   A = sum_k w_k [s_k A_k; 0]      (zero-padded to R)
    client k receives B[:, :r_k] and A[:r_k] / s_k.

Weights: w_k = p_k = n_k / n by default; with ``norm_weights`` (Cho et al.'s sparsity-weighted
aggregation) w_k = ||s_k B_k A_k||_F / sum_j ||s_j B_j A_j||_F, so clients whose update carries more
energy count more (the effective update, scaling included). ||B A||_F^2 = trace((B^T B)(A A^T)) is
computed without the dense product.

Rank self-pruning (``prune``): a client adds ``prune_decay * sum_m ||s b_r a_r^T||_F`` (the norm of its
last rank, per module) to its local loss, which pushes the tail rank towards zero. After the round, when
that tail carries less than ``prune_threshold`` times an average rank's share of the client's update,

    ||s b_r a_r^T|| < gamma * ||s B A|| / r     (summed over modules),

the client drops its last rank: its update is truncated to r - 1 and it trains rank r - 1 from then on
(never below 1). With per-layer ranks the rule runs over the modules above rank 1: each of them drops its
last rank (a module at rank 1 keeps it), and the client's pruned ranks are kept per module.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from hlora.factors import Factor
from hlora.strategies.base import ClientSpec, GlobalState, Payload, Update, register
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


def tail_ratio(adapter: dict[str, Factor]) -> float:
    """(sum_m ||s b_r a_r^T||) / (sum_m ||s B A|| / r): the last rank against an average rank's share."""
    tail = sum(abs(f.scale) * float(f.B[:, -1].norm() * f.A[-1].norm()) for f in adapter.values())
    share = sum(product_norm(f) / f.rank for f in adapter.values())
    return 0.0 if share == 0 else tail / share


@register
class HetLoRA(FedIT):
    name = "hetlora"

    def __init__(
        self,
        norm_weights: bool = False,
        prune: bool = False,
        prune_decay: float = 1e-3,
        prune_threshold: float = 0.1,
    ) -> None:
        self.norm_weights = bool(norm_weights)
        self.prune = bool(prune)
        self.prune_decay = float(prune_decay)
        self.prune_threshold = float(prune_threshold)

    def check(self, clients: list[ClientSpec]) -> None:
        """Any mix of ranks."""

    def dispatch(self, state: GlobalState, client: ClientSpec, rng: torch.Generator) -> Payload:
        pruned = state.extra.get("pruned", {}).get(client.id)
        if pruned is not None:  # one rank (every module alike), or a rank per module (per-layer ranks)
            cap = pruned if isinstance(pruned, dict) else dict.fromkeys(client.ranks, pruned)
            client = replace(client, ranks={m: min(r, cap.get(m, r)) for m, r in client.ranks.items()})
        payload = super().dispatch(state, client, rng)
        if self.prune:
            payload.tail_penalty = self.prune_decay
        return payload

    def aggregate(self, state: GlobalState, updates: list[Update]) -> GlobalState:
        if not self.prune:
            return super().aggregate(state, updates)
        pruned = dict(state.extra.get("pruned", {}))
        kept = []
        for u in updates:
            prunable = {m: f for m, f in u.lora.items() if f.rank > 1}
            if prunable and tail_ratio(prunable) < self.prune_threshold:
                lora = {m: Factor(f.B[:, :-1], f.A[:-1], f.scale) if m in prunable else f for m, f in u.lora.items()}
                ranks = {m: f.rank for m, f in lora.items()}
                pruned[u.client] = next(iter(ranks.values())) if len(set(ranks.values())) == 1 else ranks
                u = replace(u, lora=lora)
            kept.append(u)
        new = super().aggregate(state, kept)
        new.extra = {**state.extra, "pruned": pruned}
        return new

    def weights(self, state: GlobalState, updates: list[Update]) -> dict[str, list[float]]:
        if not self.norm_weights:
            return super().weights(state, updates)
        return {m: norm_weights([u.lora[m] for u in updates]) for m in state.lora}
