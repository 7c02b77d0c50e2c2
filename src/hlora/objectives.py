"""Client-side training objectives: label-skew correction and a proximal term.

A client k trains on

    L_k = CE(z + tau * (log pi_k - log pi), y)  +  mu/2 * sum_m ||s B_m A_m - s B0_m A0_m||_F^2
                                                +  mu/2 * ||h - h0||^2

* **Logit adjustment** (Menon et al. 2021, balanced softmax; FedLC, Zhang et al. 2022). ``pi_k`` is the
  client's own label distribution (add-one smoothed, so a class it lacks is not log 0) and ``pi`` the
  federation's (the label counts of all clients). With tau = 1 the adjusted softmax is the client's Bayes
  posterior when the raw logits ``z`` are the *federation's*: p_k(y|x) is proportional to
  p(y|x) pi_k(y)/pi(y). So a client holding 98% positives no longer pulls the shared head towards
  "positive"; it learns what its data says about p(x|y). The raw logits stay calibrated to the
  federation's label mix, so evaluation, export and predict use them unchanged: the adjustment changes
  training only.
* **FedProx** (Li et al. 2020): ``mu/2`` times the squared change of each adapted module's effective
  update since the round began, computed from r x r Gram products of the factors (the dense d x k matrix
  is never formed), plus the change of the trained head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hlora.factors import Adapter, Factor


def label_counts(labels: list[int] | Tensor, num_labels: int) -> Tensor:
    """How many examples of each label, in label order (int64)."""
    return torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=num_labels)


def prior_from_counts(counts: list[int] | Tensor, num_labels: int) -> Tensor:
    """Label distribution from label counts with add-one smoothing: (n_c + 1) / (n + C), float64."""
    counts = torch.as_tensor(counts).double()
    return (counts + 1.0) / (counts.sum() + num_labels)


def smoothed_prior(labels: list[int] | Tensor, num_labels: int) -> Tensor:
    """Label distribution with add-one smoothing: (n_c + 1) / (n + C), float64."""
    return prior_from_counts(label_counts(labels, num_labels), num_labels)


def offset_from_counts(client_counts: list[int] | Tensor, all_counts: list[int] | Tensor,
                       tau: float) -> Tensor:
    """tau * (log pi_k - log pi) from the client's and the federation's label counts (float32): what a
    site that knows only its own labels and the federation's counts (the Flower engine) adds."""
    num_labels = len(all_counts)
    return (tau * (prior_from_counts(client_counts, num_labels).log()
                   - prior_from_counts(all_counts, num_labels).log())).float()


def logit_offset(client_labels: list[int] | Tensor, all_labels: list[int] | Tensor, num_labels: int,
                 tau: float) -> Tensor:
    """tau * (log pi_k - log pi): what client k adds to its logits during training (float32)."""
    return offset_from_counts(label_counts(client_labels, num_labels), label_counts(all_labels, num_labels),
                              tau)


def adjusted_cross_entropy(logits: Tensor, labels: Tensor, offset: Tensor | None) -> Tensor:
    """CE(logits + offset, labels), in float32 (the offset broadcasts over the batch)."""
    logits = logits.float()
    if offset is not None:
        logits = logits + offset.to(logits.device)
    return F.cross_entropy(logits, labels)


def update_change_sq(f: Factor, f0: Factor) -> Tensor:
    """||s B A - s0 B0 A0||_F^2 from Gram products:

        ||sBA||^2 = s^2 tr((B^T B)(A A^T)),   <sBA, s0B0A0> = s s0 tr((B^T B0)(A0 A^T)).
    """
    s, s0 = f.scale, f0.scale
    B0, A0 = f0.B.to(f.B.dtype), f0.A.to(f.A.dtype)
    own = (s * s) * ((f.B.T @ f.B) * (f.A @ f.A.T)).sum()
    cross = (s * s0) * ((f.B.T @ B0) * (f.A @ A0.T)).sum()
    ref = (s0 * s0) * ((B0.T @ B0) * (A0 @ A0.T)).sum()
    return (own - 2.0 * cross + ref).clamp_min(0.0)


@dataclass
class Objective:
    """A client's loss for one round. ``offset``: the logit adjustment (None: plain CE); ``prox_mu``:
    the proximal weight, against ``start`` (the adapter and head the client received)."""

    offset: Tensor | None = None
    prox_mu: float = 0.0
    start: Adapter | None = None
    start_head: dict[str, Tensor] | None = None

    def data_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return adjusted_cross_entropy(logits, labels, self.offset)

    def proximal(self, current: dict[str, Factor], head: dict[str, Tensor]) -> Tensor | float:
        """mu/2 * (sum_m ||s B A - s B0 A0||^2 + ||h - h0||^2); 0.0 when mu is 0."""
        if not self.prox_mu or self.start is None:
            return 0.0
        total = sum(update_change_sq(current[m], self.start[m]) for m in current)
        if self.start_head is not None:
            total = total + sum(((head[n] - self.start_head[n].to(head[n].dtype)) ** 2).sum() for n in head)
        return 0.5 * self.prox_mu * total


def cosine_lr(lr: float, round: int, rounds: int, floor: float = 1 / 50) -> float:
    """The client lr of ``round`` (1-based) of ``rounds``: cosine from lr down to lr * floor (FlowerTune)."""
    if rounds <= 1:
        return lr
    progress = (round - 1) / (rounds - 1)
    low = lr * floor
    return low + (lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
