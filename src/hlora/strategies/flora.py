"""FLoRA (Wang et al., 2024): stack the clients' factors, so the product is the exact sum.

Server rule, per module, over the round's clients (weights p_k = n_k / n):

    B' = [B_1, ..., B_K],   A' = [p_1 s_1 A_1; ...; p_K s_K A_K],   B' A' = sum_k p_k s_k B_k A_k

The stacked update is merged into the frozen weights (W <- W + B' A') by every client, which then
starts a fresh LoRA of its own rank for the next round. The download is the stacked factors, whose
size grows with the number of clients: sum_k r_k (d + k) numbers per module. A client sampled again
after missing rounds downloads every stack it missed (or the merged update, as thin SVD factors or
dense, when that is smaller).

Here the merged total (W - W0) is kept as an exact thin SVD (no truncation: zero singular values only
are dropped), and a client carries it as a frozen low-rank branch beside its fresh LoRA.
"""

from __future__ import annotations

import torch

from collections.abc import Iterable

from hlora.factors import Factor, tensor_bytes
from hlora.linalg import SVD, factored_svd
from hlora.strategies.base import (
    ClientSpec,
    GlobalState,
    Payload,
    Update,
    average_heads,
    register,
    round_weights,
)
from hlora.strategies.hlora import HLoRA, svd_adapter


def stack_factors(factors: list[Factor], weights: list[float]) -> Factor:
    """B' = [B_1 .. B_K], A' = [w_1 s_1 A_1; ..; w_K s_K A_K], so B' A' = sum_k w_k s_k B_k A_k."""
    B = torch.cat([f.B for f in factors], dim=1)
    A = torch.cat([w * f.scale * f.A for f, w in zip(factors, weights)], dim=0)
    return Factor(B, A, 1.0)


def catch_up_bytes(state: GlobalState, client: int, merged: Iterable[SVD]) -> int:
    """What a client must download to hold the merged weights: the stacks of every round since it last
    took part, or the merged update itself when that is smaller, each module as its thin SVD factors or,
    once their rank passes d k / (d + k + 1), as the dense d x k matrix."""
    since = state.extra.get("synced", {}).get(client, 0)
    stacks = sum(b for rnd, b in state.extra.get("stacked_bytes", {}).items() if rnd > since)
    return min(stacks, sum(merged_bytes(svd) for svd in merged))


def merged_bytes(svd: SVD) -> int:
    """The cheaper wire form of a merged update W - W0: its thin SVD factors or the dense matrix."""
    dense = svd.U.shape[0] * svd.Vt.shape[1] * svd.U.element_size()
    return min(tensor_bytes(svd.U, svd.S, svd.Vt), dense)


def catch_up_extra(state: GlobalState, updates: list[Update], sent: int) -> dict:
    """The bookkeeping of ``catch_up_bytes`` after a round whose merged increment took ``sent`` bytes."""
    rnd = state.round + 1
    stacks = {**state.extra.get("stacked_bytes", {}), rnd: sent}
    # the round's clients hold the merged weights up to the previous round (they merge this round's
    # increment when it reaches them)
    synced = {**state.extra.get("synced", {}), **{u.client: rnd - 1 for u in updates}}
    return {"stacked_bytes": stacks, "synced": synced}


@register
class FLoRA(HLoRA):
    name = "flora"

    def dispatch(self, state: GlobalState, client: ClientSpec, rng: torch.Generator) -> Payload:
        lora = {}
        for m, svd in state.lora.items():
            d, k = svd.U.shape[0], svd.Vt.shape[1]
            r, s = client.ranks[m], client.scale(m)
            A = (torch.rand(r, k, generator=rng) * 2 - 1) / k**0.5  # a fresh LoRA: PEFT's init
            lora[m] = Factor(torch.zeros(d, r, dtype=svd.U.dtype), A.to(svd.U.dtype), s)
        frozen = {m: svd_adapter(svd) for m, svd in state.lora.items()}
        info = {"catch_up_bytes": catch_up_bytes(state, client.id, state.lora.values())}
        return Payload(lora=lora, head=state.head, frozen=frozen, info=info)

    def aggregate(self, state: GlobalState, updates: list[Update]) -> GlobalState:
        p = round_weights(updates)
        lora, sent = {}, 0
        for m, merged in state.lora.items():
            stacked = stack_factors([u.lora[m] for u in updates], p)
            sent += tensor_bytes(stacked.B, stacked.A)
            lora[m] = factored_svd([merged.U * merged.S, stacked.B], [merged.Vt, stacked.A], [1.0, 1.0])
        extra = catch_up_extra(state, updates, sent)
        return GlobalState(lora, average_heads(updates, p), state.init, state.round + 1, extra)

    def downlink_bytes(self, state: GlobalState, payload: Payload) -> int:
        """The stacks the client has missed (see ``catch_up_bytes``) and the head."""
        return payload.info["catch_up_bytes"] + tensor_bytes(*payload.head.values())
