"""Linear algebra on sums of low-rank products, without ever forming the dense matrix.

For factors B_k (d x r_k), A_k (r_k x k) and weights w_k the sum

    M = sum_k w_k B_k A_k = P @ Q,   P = [w_1 B_1, ..., w_K B_K]  (d x m),
                                     Q = [A_1; ...; A_K]          (m x k),  m = sum_k r_k

has rank <= m. Write P = U_p R_p and Q^T = U_q R_q with orthonormal U_p, U_q and small R_p, R_q; then

    M = U_p (R_p R_q^T) U_q^T,

so the SVD of the small core C = R_p R_q^T = U_c S V_c^T gives the SVD of M exactly:
U = U_p U_c, V = U_q V_c. Cost O((d + k) m^2) instead of O(d k min(d, k)).

Two ways to get the small factors, both in float64:

* float64 inputs: thin QR of P and Q^T (Householder; accurate to float64 rounding).
* float32 (and half) inputs: the m x m Gram matrices P^T P = V_p L_p V_p^T and Q Q^T (one matrix product
  and one m x m eigendecomposition each): P = U_p S_p V_p^T with U_p = P V_p S_p^-1, R_p = S_p V_p^T.
  This is about twice as fast as QR (matrix products instead of Householder sweeps). In float64 its
  error is at the level of float32 rounding (the Gram matrix squares the condition number, float64 has
  about twice float32's digits): components of P or Q below ``GRAM_TOL`` of the largest singular value
  are dropped, which changes the sum by less than the float32 rounding of its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: the Gram route keeps singular values of P (or Q) above this fraction of the largest
GRAM_TOL = 3e-7


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


def _gram_factor(X: Tensor) -> tuple[Tensor, Tensor]:
    """X (n x m) = X @ W @ R with X W orthonormal: returns (W, R) = (V_x S_x^-1, S_x V_x^T), from the
    eigendecomposition of X^T X; directions with singular value <= GRAM_TOL * the largest are dropped."""
    lam, V = torch.linalg.eigh(X.T @ X)  # ascending
    top = lam[-1] if lam.numel() else 0.0  # no columns at all (a rank-0 update)
    keep = (lam > 0) & (lam > GRAM_TOL**2 * top)
    s, V = lam[keep].sqrt(), V[:, keep]
    return V / s, s[:, None] * V.T


def factored_svd(
    Bs: list[Tensor], As: list[Tensor], weights: list[float], tol: float = 0.0, method: str = "auto"
) -> SVD:
    """SVD of ``sum_k weights[k] * Bs[k] @ As[k]`` via the stacked factors (see the module docstring).

    Computed in float64 and returned in the dtype of the inputs. Singular values at or below
    ``tol * S_max`` (and exact zeros) are dropped, so ``rank`` is the numerical rank of the sum.
    ``method``: ``qr``, ``gram``, or ``auto`` (QR for float64 inputs, Gram otherwise).
    """
    if method not in ("auto", "qr", "gram"):
        raise ValueError(f"method must be auto, qr or gram, got {method!r}")
    if not Bs or len(Bs) != len(As) or len(Bs) != len(weights):
        raise ValueError("factored_svd needs as many B, A and weights, at least one of each")
    dtype = Bs[0].dtype
    w = torch.cat([torch.full((B.shape[1],), float(wk), dtype=torch.float64) for B, wk in zip(Bs, weights)])
    P = torch.cat(Bs, dim=1).double() * w  # d x m, column j scaled by its client's weight
    Q = torch.cat(As, dim=0).double()  # m x k
    if method == "qr" or (method == "auto" and dtype == torch.float64):
        Qp, Rp = torch.linalg.qr(P, mode="reduced")
        Qq, Rq = torch.linalg.qr(Q.T, mode="reduced")
        Uc, S, Vct = torch.linalg.svd(Rp @ Rq.T, full_matrices=False)
        U, Vt = Qp @ Uc, Vct @ Qq.T
    else:
        Wp, Rp = _gram_factor(P)
        Wq, Rq = _gram_factor(Q.T)
        Uc, S, Vct = torch.linalg.svd(Rp @ Rq.T, full_matrices=False)
        U, Vt = P @ (Wp @ Uc), (Vct @ Wq.T) @ Q
    keep = S > (tol * S[0] if S.numel() and tol > 0 else 0.0)
    keep_n = int(keep.sum())
    return SVD(U[:, :keep_n].to(dtype), S[:keep_n].to(dtype), Vt[:keep_n].to(dtype))
