"""LoRA-FAIR (Bian et al., ICCV 2025): average the factors, then correct B so that the product fits the
average of the clients' updates.

Server rule, per module (global factors at scaling 1, R the largest rank, [.] zero-padding to R):

    B_bar = sum_k p_k [B_k, 0],    A_bar = sum_k p_k [s_k A_k; 0]             (FedAvg of the factors)
    dW    = sum_k p_k s_k B_k A_k                                              (the average of the updates)
    dB    = argmin_X ||(B_bar + X) A_bar - dW||_F^2 + mu ||X||_F^2,   mu = lam * tr(A_bar A_bar^T) / R
          = (dW A_bar^T - B_bar G) (G + mu I)^-1,                     G = A_bar A_bar^T   (R x R)

and every client starts from (B_bar + dB, A_bar): client k receives (B_bar + dB)[:, :r_k] and
A_bar[:r_k] / s_k. dW is never formed: dW A_bar^T = sum_k p_k s_k B_k (A_k A_bar^T) takes r_k x R products,
so the cost is O((d + k) R sum_k r_k + R^3) a module.

The paper's objective is min_dB S(dW, (B_bar + dB) A_bar) + lam ||dB|| with S the cosine similarity,
solved by SGD on the server, lam = 0.01. Here the fit is the squared Frobenius distance instead, whose
minimiser has the closed form above (no server-side optimiser and its settings), and the ridge is
relative to the mean eigenvalue of G, so that ``lam`` is dimensionless (the same for any scale of the
factors); with ``lam = 0`` it is the least-squares fit of dW on A_bar's rows (the smallest dB when G is
singular). ``lam`` defaults to the paper's 0.01 (its meaning differs, see above); it keeps B_bar + dB
near B_bar along the directions that A_bar barely spans.

Mixed ranks: the paper's clients share one rank; here they are zero-padded as HetLoRA (a rank that no
client of the round holds keeps its previous value), and dW is the average of the clients' own updates
whatever their ranks.
"""

from __future__ import annotations

import torch

from hlora.factors import Factor
from hlora.strategies.base import ClientSpec, GlobalState, StrategyError, Update, register
from hlora.strategies.fedit import FedIT


def correction(avg: Factor, factors: list[Factor], weights: list[float], lam: float) -> torch.Tensor:
    """dB = (dW A^T - B G)(G + mu I)^+ for the averaged factors (B, A) = ``avg`` (see the module docstring),
    in float64 from r_k x R products; the pseudo-inverse gives the smallest dB when G + mu I is singular."""
    B, A = avg.B.double(), avg.A.double()
    G = A @ A.T
    target = sum(w * f.scale * (f.B.double() @ (f.A.double() @ A.T)) for f, w in zip(factors, weights))
    mu = lam * float(G.trace()) / max(avg.rank, 1)
    eye = torch.eye(avg.rank, dtype=G.dtype)
    return ((target - B @ G) @ torch.linalg.pinv(G + mu * eye, hermitian=True)).to(avg.B.dtype)


@register
class LoRAFAIR(FedIT):
    name = "lorafair"

    def __init__(self, lam: float = 0.01) -> None:
        try:
            self.lam = float(lam)
        except (TypeError, ValueError):
            self.lam = float("nan")
        if not self.lam >= 0:
            raise StrategyError(f"lorafair's lam (the ridge on dB) must be a number >= 0, got {lam!r}")

    def check(self, clients: list[ClientSpec]) -> None:
        """Any mix of ranks (zero-padded, see the module docstring)."""

    def aggregate(self, state: GlobalState, updates: list[Update]) -> GlobalState:
        new = super().aggregate(state, updates)
        p = self.weights(state, updates)
        for m, avg in new.lora.items():
            dB = correction(avg, [u.lora[m] for u in updates], p[m], self.lam)
            new.lora[m] = Factor(avg.B + dB, avg.A, 1.0)
        return new
