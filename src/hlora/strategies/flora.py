"""FLoRA (Wang et al., 2024): stack the clients' factors, so the product is the exact sum.

Server rule, per module, over the round's clients (weights p_k = n_k / n):

    B' = [B_1, ..., B_K],   A' = [p_1 s_1 A_1; ...; p_K s_K A_K],   B' A' = sum_k p_k s_k B_k A_k

The stacked update is merged into the frozen weights (W <- W + B' A') by every client, which then
starts a fresh LoRA of its own rank for the next round. The download is the stacked factors, whose
size grows with the number of clients: sum_k r_k (d + k) numbers per module. A client sampled again
after missing rounds downloads every stack it missed (or the merged update, when that is smaller).

Here the merged total (W - W0) is kept as an exact thin SVD (no truncation: zero singular values only
are dropped), and a client carries it as a frozen low-rank branch beside its fresh LoRA.
"""

from __future__ import annotations

import torch

from hlora.factors import Factor, tensor_bytes
from hlora.linalg import factored_svd
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
        return Payload(lora=lora, head=state.head, frozen=frozen, info={"catch_up_bytes": self._catch_up(state, client)})

    @staticmethod
    def _catch_up(state: GlobalState, client: ClientSpec) -> int:
        """What a client must download to hold the merged weights: the stacks of every round since it
        last took part, or the merged update itself (thin SVD factors) when that is smaller."""
        since = state.extra.get("synced", {}).get(client.id, 0)
        stacks = sum(b for rnd, b in state.extra.get("stacked_bytes", {}).items() if rnd > since)
        merged = sum(tensor_bytes(svd.U, svd.S, svd.Vt) for svd in state.lora.values())
        return min(stacks, merged)

    def aggregate(self, state: GlobalState, updates: list[Update]) -> GlobalState:
        p = round_weights(updates)
        lora, sent = {}, 0
        for m, merged in state.lora.items():
            stacked = stack_factors([u.lora[m] for u in updates], p)
            sent += tensor_bytes(stacked.B, stacked.A)
            lora[m] = factored_svd([merged.U * merged.S, stacked.B], [merged.Vt, stacked.A], [1.0, 1.0])
        rnd = state.round + 1
        stacks = {**state.extra.get("stacked_bytes", {}), rnd: sent}
        # the round's clients hold the merged weights up to the previous round (they merge this
        # round's stack when it reaches them)
        synced = {**state.extra.get("synced", {}), **{u.client: rnd - 1 for u in updates}}
        extra = {"stacked_bytes": stacks, "synced": synced}
        return GlobalState(lora, average_heads(updates, p), state.init, rnd, extra)

    def downlink_bytes(self, state: GlobalState, payload: Payload) -> int:
        """The stacks the client has missed (see ``_catch_up``) and the head."""
        return payload.info["catch_up_bytes"] + tensor_bytes(*payload.head.values())
