"""Robust aggregation: which client updates survive a round, and by how much each may move the model.

A robust rule judges the round's valid updates and returns a :class:`Verdict`: the clients it rejects
(with the reason, recorded in the round's ``rejected`` list) and the clients whose change it scales
down (``normclip``). The strategy then aggregates the survivors with its own math: HLoRA stays HLoRA.

**The per-client object** is client k's change of effective update this round, over every adapted
module m and the head h,

    Delta_k = ( s_k B_k^m A_k^m - s_k B0_k^m A0_k^m )_m  (+)  ( h_k - h0_k )

(B0, A0, h0: what client k received). Each module's change is a product of stacked factors,

    s B A - s B0 A0 = P Q,    P = [s B, -s B0]  (d x 2r),   Q = [A; A0]  (2r x k),

so inner products never need the dense d x k matrix:

    <P_i Q_i, P_j Q_j>_F = sum( (P_i^T P_j) * (Q_i Q_j^T) )          (2r_i x 2r_j products)

and the squared distances of Krum are ||Delta_i - Delta_j||^2 = G_ii + G_jj - 2 G_ij with G the
K x K Gram matrix of the changes (float64). Cost per module O((d + k) M^2), M = 2 sum_k r_k.

Rules (``--robust``; K: the round's valid updates, f: ``--robust-f``, the assumed number of Byzantine
clients among them):

* ``krum`` (Blanchard et al. 2017): score_i = sum of the squared distances from Delta_i to its
  K - f - 2 nearest other changes (at least 1); the client of the lowest score survives, alone.
* ``multikrum``: the m lowest scores survive (``--robust-m``, default K - f), scores computed once as in
  the paper's Multi-Krum and Flower's Krum. Both need K > 2f + 2 (checked against ``--per-round``).
* ``median`` / ``trimmed``: the coordinate-wise median, or the coordinate-wise beta-trimmed mean (the
  floor(beta K) largest and smallest values of every coordinate dropped; ``--robust-trim`` beta, default
  f / K, so f values per side, Yin et al. 2018) of the clients' dense changes. These statistics are dense
  full-rank matrices that no low-rank strategy can take without a truncation that changes its math, so
  here they are the *reference* of a selection: the f clients farthest from it (in ||Delta_k - C||_F
  over modules and head) are rejected and the rest aggregate with the strategy's rule. This keeps the
  strategy exact on its survivors and the rule comparable with Multi-Krum (both remove clients). They
  are dense per module (K x d x k numbers, sorted): allowed where that fits ``--robust-dense-mb``,
  refused with one line where it does not (:meth:`Robust.check_dense`).
* ``normclip``: norm bounding. tau = ``--robust-clip`` (fixed), or ``--robust-clip-ratio`` times the
  round's median ||Delta_k||. A client above it is scaled by c_k = tau / ||Delta_k||: it uploads, in
  effect, its starting point plus c_k times its change (:func:`clip_update`).

What is exact: the distances, norms and the median/trimmed statistics (tested against dense float64).
``normclip`` is exact (||c Delta|| = tau) for strategies whose aggregate is linear in the clients'
products s B A (``Strategy.aggregates_products``: hlora, flexlora, flora), and for factor-space
strategies whose clients train one factor (ffa, rolora); for the other factor-space strategies it scales
the factors' changes, to first order c Delta (see :func:`clip_update`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hlora.factors import Factor
from hlora.strategies import Payload, StrategyError, Update

RULES = ("none", "krum", "multikrum", "median", "trimmed", "normclip")
#: rules computed on dense per-module changes (the rest work from factors only)
DENSE = ("median", "trimmed")
#: bytes per entry of a module's K x d x k dense changes while its coordinates are sorted: the float32
#: changes, the sorted values and torch.sort's int64 indices
DENSE_BYTES_PER_ENTRY = 16


class RobustError(StrategyError):
    """A robust rule that cannot run with the given options or shapes (a user mistake)."""


@dataclass
class Verdict:
    """A robust rule's decision on a round's updates."""

    #: index (in the judged list) -> why it is rejected
    rejected: dict[int, str] = field(default_factory=dict)
    #: client id -> c_k < 1, the factor its change is scaled by (normclip)
    scales: dict[int, float] = field(default_factory=dict)


@dataclass
class Robust:
    """A robust rule's settings (``--robust`` and its ``--robust-*`` options)."""

    rule: str = "none"
    f: int = 1
    m: int | None = None
    trim: float | None = None
    clip: float | None = None
    clip_ratio: float = 1.0
    dense_mb: float = 2048.0

    def check(self, per_round: int) -> "Robust":
        """Refuse options out of range, or too few clients a round for the rule (raises RobustError)."""
        if self.rule not in RULES:
            raise RobustError(f"--robust must be one of {', '.join(RULES)}, got {self.rule!r}")
        if self.f < 0:
            raise RobustError(f"--robust-f (the assumed number of Byzantine clients) must be >= 0, got {self.f}")
        if self.m is not None and self.rule != "multikrum":
            raise RobustError("--robust-m applies to --robust multikrum only")
        if self.m is not None and not 1 <= self.m <= per_round:
            raise RobustError(f"--robust-m must be between 1 and --per-round ({per_round}), got {self.m}")
        if self.trim is not None and (self.rule != "trimmed" or not 0 <= self.trim < 0.5):
            raise RobustError(
                f"--robust-trim applies to --robust trimmed and must be in [0, 0.5), got {self.trim}")
        if self.clip is not None and (self.rule != "normclip" or self.clip <= 0):
            raise RobustError(f"--robust-clip applies to --robust normclip and must be > 0, got {self.clip}")
        if self.clip_ratio <= 0:
            raise RobustError(f"--robust-clip-ratio must be > 0, got {self.clip_ratio}")
        if self.dense_mb <= 0:
            raise RobustError(f"--robust-dense-mb must be > 0, got {self.dense_mb}")
        if self.rule in ("krum", "multikrum") and per_round <= 2 * self.f + 2:
            raise RobustError(f"--robust {self.rule} needs --per-round > 2 * --robust-f + 2 (Krum's n > 2f + 2); "
                              f"got per-round {per_round} and f {self.f}")
        if self.rule in DENSE and per_round <= 2 * self.f:
            raise RobustError(f"--robust {self.rule} tolerates fewer than half Byzantine clients: needs "
                              f"--per-round > 2 * --robust-f; got per-round {per_round} and f {self.f}")
        return self

    def check_dense(self, shapes: dict[str, tuple[int, int]], clients: int) -> None:
        """Refuse ``median``/``trimmed`` where one module's dense changes of ``clients`` clients would not fit
        ``dense_mb``: one line naming the module, the bytes and the factored alternatives."""
        if self.rule not in DENSE or not shapes:
            return
        name, (d, k) = max(shapes.items(), key=lambda kv: kv[1][0] * kv[1][1])
        need = clients * d * k * DENSE_BYTES_PER_ENTRY
        if need > self.dense_mb * 2**20:
            raise RobustError(
                f"--robust {self.rule} sorts the dense changes of every module: {clients} clients x {d} x {k} "
                f"at {name} need {need / 2**20:.0f} MB, above --robust-dense-mb {self.dense_mb:g}; use krum, "
                "multikrum or normclip (computed from the factors), or raise the budget"
            )

    def judge(self, updates: list[Update], sent: list[Payload]) -> Verdict:
        """The rule's verdict on a round's valid updates (``sent[i]``: what ``updates[i]`` answered)."""
        K = len(updates)
        if self.rule == "none" or K < 2:
            return Verdict()
        if self.rule in ("krum", "multikrum"):
            scores = krum_scores(pairwise_sq_distances(change_gram(updates, sent)), self.f)
            keep = 1 if self.rule == "krum" else min(K, self.m or max(1, K - self.f))
            order = sorted(range(K), key=lambda i: (float(scores[i]), i))
            bar = float(scores[order[keep - 1]])
            why = "lowest score" if keep == 1 else f"{keep} lowest scores"
            return Verdict({
                i: f"{self.rule}: score {float(scores[i]):.3g} (squared distances to its {neighbours(K, self.f)} "
                   f"nearest) is not among the {why} (kept up to {bar:.3g}; f={self.f})"
                for i in order[keep:]
            })
        if self.rule in DENSE:
            cut = self.f if self.trim is None else math.floor(self.trim * K + 1e-9)
            cut = min(cut, (K - 1) // 2)
            center = coordinate_median if self.rule == "median" else lambda X: trimmed_mean(X, cut)
            dist = distances_to_center(updates, sent, center)
            drop = min(self.f, K - 1)
            order = sorted(range(K), key=lambda i: (-float(dist[i]), i))[:drop]
            what = "median" if self.rule == "median" else f"trimmed mean (trim {cut} a side)"
            return Verdict({
                i: f"{self.rule}: distance {float(dist[i]):.3g} to the coordinate-wise {what} is among the {drop} "
                   f"farthest of {K} (f={self.f})"
                for i in order
            })
        norms = change_gram(updates, sent).diagonal().clamp_min(0).sqrt().tolist()  # normclip
        tau = self.clip if self.clip is not None else self.clip_ratio * statistics.median(norms)
        return Verdict(scales={u.client: c for u, c in zip(updates, clip_factors(norms, tau)) if c < 1})


def change_factors(update: Update, payload: Payload, module: str) -> tuple[Tensor, Tensor]:
    """One module's change s B A - s0 B0 A0 as stacked factors (P, Q) = ([s B, -s0 B0], [A; A0]), float64."""
    f, f0 = update.lora[module], payload.lora[module]
    P = torch.cat([f.scale * f.B.double(), -f0.scale * f0.B.double()], 1)
    return P, torch.cat([f.A.double(), f0.A.double()], 0)


def head_change(update: Update, payload: Payload) -> Tensor:
    """The head's change h - h0, flattened (float64; empty without a trained head)."""
    parts = [(update.head[n].double() - t.double()).flatten() for n, t in payload.head.items()]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def change_gram(updates: list[Update], sent: list[Payload]) -> Tensor:
    """G_ij = <Delta_i, Delta_j> over modules and head (K x K, float64), from r x r products of the factors.

    Per module, with every client's stacked factors side by side (P = [P_1 .. P_K], Q = [Q_1; ..; Q_K]),
    (P^T P) * (Q Q^T) summed over the blocks (i, j) is <P_i Q_i, P_j Q_j>_F. One module at a time: the float64
    copies alive at once are one module's (at 7B shapes ~40 MB, not the ~3.7 GB of every module's).
    """
    K = len(updates)
    heads = torch.stack([head_change(u, p) for u, p in zip(updates, sent)])
    G = heads @ heads.T
    for m in updates[0].lora:
        stacked = [change_factors(u, p, m) for u, p in zip(updates, sent)]
        P = torch.cat([s[0] for s in stacked], 1)
        Q = torch.cat([s[1] for s in stacked], 0)
        owner = torch.cat([torch.full((s[1].shape[0],), i) for i, s in enumerate(stacked)])
        E = torch.zeros(K, len(owner), dtype=torch.float64)
        E[owner, torch.arange(len(owner))] = 1.0
        G += E @ ((P.T @ P) * (Q @ Q.T)) @ E.T
    return G


def pairwise_sq_distances(gram: Tensor) -> Tensor:
    """||Delta_i - Delta_j||^2 = G_ii + G_jj - 2 G_ij (clamped at 0, zero diagonal)."""
    d = gram.diagonal()
    D = (d[:, None] + d[None, :] - 2 * gram).clamp_min(0)
    return D.fill_diagonal_(0)


def neighbours(K: int, f: int) -> int:
    """Krum's neighbourhood: the K - f - 2 nearest other clients (at least 1, at most K - 1)."""
    return max(1, min(K - 1, K - f - 2))


def krum_scores(sq_dist: Tensor, f: int) -> Tensor:
    """score_i = sum of the ``neighbours(K, f)`` smallest ||Delta_i - Delta_j||^2, j != i."""
    K = sq_dist.shape[0]
    others = sq_dist + torch.diag(torch.full((K,), float("inf"), dtype=sq_dist.dtype))
    return others.topk(neighbours(K, f), dim=1, largest=False).values.sum(1)


def dense_changes(updates: list[Update], sent: list[Payload], module: str) -> Tensor:
    """The K x d x k dense changes s B A - s0 B0 A0 of one module (the factors' dtype)."""
    return torch.stack([u.lora[module].delta() - p.lora[module].delta() for u, p in zip(updates, sent)])


def coordinate_median(X: Tensor) -> Tensor:
    """The median over dim 0 of every coordinate (the mean of the two middle values when K is even)."""
    s = X.sort(dim=0).values
    K = X.shape[0]
    return (s[(K - 1) // 2] + s[K // 2]) / 2


def trimmed_mean(X: Tensor, cut: int) -> Tensor:
    """The mean over dim 0 of every coordinate after dropping its ``cut`` largest and ``cut`` smallest values."""
    K = X.shape[0]
    if not 0 <= 2 * cut < K:
        raise RobustError(f"a trimmed mean of {K} values cannot drop {cut} on each side")
    return X.sort(dim=0).values[cut:K - cut].mean(0)


def distances_to_center(updates: list[Update], sent: list[Payload], center) -> Tensor:
    """||Delta_k - C||_F over modules and head, C = ``center(X)`` of each module's dense changes X (K x ...)."""
    heads = torch.stack([head_change(u, p) for u, p in zip(updates, sent)])
    sq = ((heads - center(heads)) ** 2).sum(1) if heads.shape[1] else heads.new_zeros(len(updates))
    for m in updates[0].lora:
        X = dense_changes(updates, sent, m)
        sq += ((X - center(X)) ** 2).sum((1, 2)).double()
    return sq.sqrt()


def clip_factors(norms: list[float], bound: float) -> list[float]:
    """c_k = min(1, bound / ||Delta_k||): the factor that brings each change within ``bound``."""
    return [1.0 if n <= bound else bound / n for n in norms]


def clip_update(update: Update, payload: Payload, c: float, products: bool) -> Update:
    """Client k's update with its change scaled by c: in effect it uploads X0 + c Delta.

    ``products`` (a strategy linear in the clients' products s B A): the exact clipped update
    s B0 A0 + c (s B A - s B0 A0), as the rank r0 + r factor

        B' = [c B, (1 - c) B0],   A' = [A; A0]        (scale s; B0 = 0 drops its block: rank r)

    which such a strategy aggregates exactly (it stacks the products of any rank). Factor-space strategies
    average the factors, so they get the factors' changes scaled, B0 + c (B - B0) and A0 + c (A - A0),
    whose product is X0 + c Delta - c (1 - c) s dB dA: exact when one factor is frozen (ffa, rolora), and
    otherwise c Delta to first order (the residual is second order in the round's change). The head:
    h0 + c (h - h0), exact.
    """
    lora = {}
    for m, f in update.lora.items():
        f0 = payload.lora[m]
        if products and not bool(f0.B.any()):
            lora[m] = Factor(c * f.B, f.A, f.scale)
        elif products:
            lora[m] = Factor(torch.cat([c * f.B, (1 - c) * f0.B], 1), torch.cat([f.A, f0.A], 0), f.scale)
        else:
            lora[m] = Factor(f0.B + c * (f.B - f0.B), f0.A + c * (f.A - f0.A), f.scale)
    head = {n: payload.head[n] + c * (t - payload.head[n]) for n, t in update.head.items()}
    return dataclasses.replace(update, lora=lora, head=head)
