"""Linear algebra on sums of low-rank products, without ever forming the dense matrix.

For factors B_k (d x r_k), A_k (r_k x k) and weights w_k the sum

    M = sum_k w_k B_k A_k = P @ Q,   P = [w_1 B_1, ..., w_K B_K]  (d x m),
                                     Q = [A_1; ...; A_K]          (m x k),  m = sum_k r_k

has rank <= m. With thin QR decompositions P = Q_p R_p and Q^T = Q_q R_q,

    M = Q_p (R_p R_q^T) Q_q^T,

so the SVD of the small m x m core C = R_p R_q^T = U_c S V_c^T gives the SVD of M exactly:
U = Q_p U_c, V = Q_q V_c. Cost O((d + k) m^2) instead of O(d k min(d, k)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SVD:
    """A thin SVD ``U @ diag(S) @ Vt`` with singular values in descending order."""

    U: Tensor  # d x m
    S: Tensor  # m
    Vt: Tensor  # m x k

    @property
    def rank(self) -> int:
        return self.S.shape[0]

    def dense(self) -> Tensor:
        return (self.U * self.S) @ self.Vt

    def truncate(self, r: int) -> "SVD":
        """The best rank-r approximation (Eckart-Young): the r leading triplets."""
        return SVD(self.U[:, :r], self.S[:r], self.Vt[:r])


def factored_svd(
    Bs: list[Tensor], As: list[Tensor], weights: list[float], tol: float = 0.0
) -> SVD:
    """SVD of ``sum_k weights[k] * Bs[k] @ As[k]`` via QR of the stacked factors.

    Computed in float64 and returned in the dtype of the inputs. Singular values at or below
    ``tol * S_max`` (and exact zeros) are dropped, so ``rank`` is the numerical rank of the sum.
    """
    if not Bs or len(Bs) != len(As) or len(Bs) != len(weights):
        raise ValueError("factored_svd needs as many B, A and weights, at least one of each")
    dtype = Bs[0].dtype
    P = torch.cat([w * B.double() for B, w in zip(Bs, weights)], dim=1)
    Q = torch.cat([A.double() for A in As], dim=0)
    Qp, Rp = torch.linalg.qr(P, mode="reduced")
    Qq, Rq = torch.linalg.qr(Q.T, mode="reduced")
    Uc, S, Vct = torch.linalg.svd(Rp @ Rq.T, full_matrices=False)
    U, Vt = Qp @ Uc, Vct @ Qq.T
    keep = S > (tol * S[0] if S.numel() and tol > 0 else 0.0)
    keep_n = int(keep.sum())
    return SVD(U[:, :keep_n].to(dtype), S[:keep_n].to(dtype), Vt[:keep_n].to(dtype))
