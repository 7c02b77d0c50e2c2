"""FedEx-LoRA (Singhal et al., 2024): average A and B, and fold the averaging error into the frozen weights.

Server rule, per module, over the round's clients k (weights p_k = n_k / n; global factors at scaling 1,
R the largest rank, [.] zero-padding to R as in HetLoRA):

    B' = sum_k p_k [B_k, 0],    A' = sum_k p_k [s_k A_k; 0]                 (FedAvg of the factors)
    E' = E + sum_k p_k (T_k + s_k B_k A_k) - B' A'                           (the error term)

E is the residual every client adds to its frozen weights, T_k = B[:, r_k:] A[r_k:] the part of the
previous global factors above client k's rank. The global model is exact, the average of the clients'
trained models:

    W0 + E' + B' A' = W0 + E + sum_k p_k (T_k + s_k B_k A_k).

Client k receives B[:, :r_k] and A[:r_k] / s_k as its LoRA and E + T_k as a frozen branch, so it starts
from W0 + E + B A exactly.

Mixed ranks: zero-padded as HetLoRA, and exact all the same: the part of the global factors above r_k
travels in the client's frozen branch (T_k), so every client starts from the exact global model whatever
its rank. With equal ranks T_k = 0 and this is the paper's rule. A rank that no client of the round holds
keeps its previous value in (B', A') (as in HetLoRA); E' accounts for it.

E is kept factored, as a thin SVD of the stacked terms (``linalg.factored_svd``): exact, except that
singular values below the float rounding of the terms (eps * sum of their Frobenius norms) are dropped.
Its rank grows by at most sum_k r_k + 2R a round, up to min(d, k).

Download: the global factors at rank R (the first r_k trainable, the rest frozen), the head, and the
error terms of the rounds since the client last took part, each as its stacked factors ([B_k], [p_k s_k
A_k], the tail term, (B', -A')), or the whole of E when that is smaller, as its thin SVD or dense (FLoRA's
catch-up). Upload: B_k, A_k and the head.
"""

from __future__ import annotations

import torch

from hlora.factors import Adapter, Factor, tensor_bytes
from hlora.linalg import SVD, factored_svd
from hlora.strategies.base import ClientSpec, GlobalState, Payload, Update, register
from hlora.strategies.fedit import FedIT
from hlora.strategies.flora import catch_up_bytes, catch_up_extra
from hlora.strategies.hetlora import product_norm
from hlora.strategies.hlora import empty_svd


def with_residual(E: SVD, g: Factor, r: int = 0) -> Factor:
    """E + B[:, r:] A[r:] as one factor at scaling 1 (r = 0: the whole global update E + B A)."""
    return Factor(torch.cat([E.U * E.S, g.B[:, r:]], dim=1), torch.cat([E.Vt, g.A[r:]], dim=0), 1.0)


def error_terms(g: Factor, factors: list[Factor], weights: list[float], new: Factor) -> list[Factor]:
    """The round's error sum_k w_k (T_k + s_k B_k A_k) - B' A' as factors whose ``scale`` is their weight.

    The tails T_k = B[:, r_k:] A[r_k:] of the previous global factors g combine into one term B diag(c) A,
    c_j = sum of the w_k with r_k <= j.
    """
    terms = [Factor(f.B, f.A, w * f.scale) for f, w in zip(factors, weights)]
    ranks = [f.rank for f in factors]
    c = [sum(w for w, r in zip(weights, ranks) if r <= j) for j in range(g.rank)]
    c = torch.tensor(c, dtype=g.A.dtype)
    if bool((c != 0).any()):
        terms.append(Factor(g.B, c[:, None] * g.A, 1.0))
    return terms + [Factor(new.B, new.A, -1.0)]


def add_terms(E: SVD, terms: list[Factor]) -> SVD:
    """E + sum of the terms as a thin SVD, without the directions below the terms' float rounding."""
    parts = [Factor(E.U * E.S, E.Vt, 1.0), *terms]
    full = factored_svd([t.B for t in parts], [t.A for t in parts], [t.scale for t in parts])
    rounding = torch.finfo(full.S.dtype).eps * sum(product_norm(t) for t in parts)
    return full.truncate(int((full.S > rounding).sum()))


@register
class FedExLoRA(FedIT):
    name = "fedex"

    def check(self, clients: list[ClientSpec]) -> None:
        """Any mix of ranks (zero-padded; exact through the frozen branch, see the module docstring)."""

    def init_state(self, init: Adapter, head: dict[str, torch.Tensor]) -> GlobalState:
        state = super().init_state(init, head)
        state.extra = {"residual": {m: empty_svd(f) for m, f in init.items()}}
        return state

    def dispatch(self, state: GlobalState, client: ClientSpec, rng: torch.Generator) -> Payload:
        payload = super().dispatch(state, client, rng)
        E = state.extra["residual"]
        payload.frozen = {m: with_residual(E[m], g, client.ranks[m]) for m, g in state.lora.items()}
        payload.info = {"catch_up_bytes": catch_up_bytes(state, client.id, E.values())}
        return payload

    def aggregate(self, state: GlobalState, updates: list[Update]) -> GlobalState:
        new = super().aggregate(state, updates)
        p = self.weights(state, updates)
        residual, sent = {}, 0
        for m, g in state.lora.items():
            terms = error_terms(g, [u.lora[m] for u in updates], p[m], new.lora[m])
            sent += sum(tensor_bytes(t.B, t.A) for t in terms)
            residual[m] = add_terms(state.extra["residual"][m], terms)
        new.extra = {**catch_up_extra(state, updates, sent), "residual": residual}
        return new

    def global_adapter(self, state: GlobalState) -> Adapter:
        return {m: with_residual(state.extra["residual"][m], g) for m, g in state.lora.items()}

    def downlink_bytes(self, state: GlobalState, payload: Payload) -> int:
        """The global factors at rank R, the error terms the client has missed, and the head."""
        factors = sum(tensor_bytes(g.B, g.A) for g in state.lora.values())
        return factors + payload.info["catch_up_bytes"] + tensor_bytes(*payload.head.values())
