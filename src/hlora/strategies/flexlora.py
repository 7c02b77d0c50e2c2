"""FlexLoRA (Bai et al., 2024): HLoRA's product aggregation, singular values on the B side.

Server rule, as HLoRA: dW = sum_k p_k s_k B_k A_k = U S V^T. Client k receives

    B = U_r S_r,   A = V_r^T / s_k,     so that  s_k B A = U_r S_r V_r^T.

The effective update each client starts from is the same as HLoRA's; only the split of the singular
values between the factors differs, which changes the local optimisation (A is orthonormal here).
"""

from __future__ import annotations

from hlora.factors import Factor
from hlora.linalg import SVD
from hlora.strategies.base import register
from hlora.strategies.hlora import HLoRA


def flexlora_split(svd: SVD, r: int, scale: float) -> Factor:
    """FlexLoRA's rank-r factors at LoRA scaling s: B = U_r S_r, A = V_r^T / s."""
    t = svd.truncate(r)
    return Factor(t.U * t.S, t.Vt / scale, scale)


@register
class FlexLoRA(HLoRA):
    name = "flexlora"

    @staticmethod
    def split(svd: SVD, r: int, scale: float) -> Factor:
        return flexlora_split(svd, r, scale)
