"""Simulated attackers, so that the robust rules are measured rather than assumed (``hlora run`` only).

A seeded subset of the clients attacks in every round it is sampled (``--attackers FRACTION``:
round(FRACTION x clients) of them, drawn once per run from the seed). An attacker trains as an honest
client would, then tampers with what it uploads (or, for ``labelflip``, with its data). Notation as in
:mod:`hlora.robust`: the client received B0, A0, h0 and trained to B, A, h; dB = B - B0, dA = A - A0;
its honest change is Delta = s B A - s B0 A0 (and h - h0). ``--attack-lambda`` L:

* ``signflip``: the change times -L. An attacker must upload rank-r factors of the shapes it was sent
  (anything else fails the shape check), and -L Delta = -L (s dB A0 + s B0 dA + s dB dA) has rank up to
  r0 + r, so it is in general not exactly representable at rank r. The attacker flips the factors'
  changes, B0 - L dB and A0 - L dA, whose product is X0 - L Delta + (L + L^2) s dB dA: exact when one
  factor is frozen (ffa, rolora), and otherwise -L Delta to first order (the residual is second order in
  the round's change). The head: h0 - L (h - h0), exact. Default L = 1.
* ``scale``: the same with +L (B0 + L dB, A0 + L dA, h0 + L (h - h0)): L Delta to first order. Default
  L = 5, half the default ``--max-norm-ratio`` bound, so the norm check alone does not catch it.
* ``noise``: Gaussian noise in place of the change, at L times the honest norm, module by module: the
  trained factor gets the noise (B0 + a N with N ~ N(0, 1), A = A0; or A0 + a N when B is frozen), a
  chosen so that ||s a N A0||_F (or ||s B0 a N||_F) equals L ||s B A - s B0 A0||_F; the head likewise.
  Default L = 1.
* ``labelflip``: a data attack: the attacker trains on its examples with label y replaced by
  C - 1 - y (C labels; for a binary task, 0 <-> 1), and its logit adjustment uses the flipped label mix.
  Classification tasks only; no L.

``metrics.jsonl`` records, per round, the sampled attackers and which of them and of the honest clients
were rejected (by any check: validation, the norm bound or the robust rule).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hlora.factors import Factor
from hlora.server import client_seed
from hlora.strategies import Payload, StrategyError, Update
from hlora.strategies.hetlora import product_norm

ATTACKS = ("none", "signflip", "scale", "noise", "labelflip")
#: L when --attack-lambda is not given
DEFAULT_LAMBDA = {"signflip": 1.0, "scale": 5.0, "noise": 1.0}


class AttackError(StrategyError):
    """An attack that cannot be simulated with the given options (a user mistake)."""


def check_attack(kind: str, fraction: float, lam: float | None, *, pooled: bool, classify: bool) -> None:
    """Refuse attack options out of range or an attack the run cannot simulate (raises AttackError)."""
    if kind not in ATTACKS:
        raise AttackError(f"--attack must be one of {', '.join(ATTACKS)}, got {kind!r}")
    if not 0 <= fraction < 1:
        raise AttackError(f"--attackers is the fraction of clients that attack, in [0, 1); got {fraction}")
    if kind == "none":
        if fraction or lam is not None:
            raise AttackError("--attackers and --attack-lambda need --attack signflip, scale, noise or labelflip")
        return
    if lam is not None and (kind == "labelflip" or lam <= 0):
        raise AttackError(f"--attack-lambda applies to signflip, scale and noise and must be > 0, got {lam}")
    if pooled:
        raise AttackError("--attack needs clients that upload updates; the centralized strategy pools their data")
    if kind == "labelflip" and not classify:
        raise AttackError("--attack labelflip flips class labels: classification tasks only")


def choose_attackers(clients: int, fraction: float, seed: int) -> list[int]:
    """round(fraction x clients) client ids, drawn once per run from the seed (sorted)."""
    n = int(round(fraction * clients))
    return sorted(np.random.default_rng([seed, 3]).choice(clients, n, replace=False).tolist())


def scale_change(update: Update, payload: Payload, factor: float) -> Update:
    """B0 + factor dB, A0 + factor dA, h0 + factor (h - h0): the change times ``factor`` to first order
    (``factor`` = -L: signflip, +L: scale)."""
    lora = {m: Factor(f0.B + factor * (update.lora[m].B - f0.B), f0.A + factor * (update.lora[m].A - f0.A),
                      update.lora[m].scale) for m, f0 in payload.lora.items()}
    head = {n: h0 + factor * (update.head[n] - h0) for n, h0 in payload.head.items()}
    return dataclasses.replace(update, lora=lora, head=head)


def noise_change(update: Update, payload: Payload, lam: float, generator: torch.Generator) -> Update:
    """Gaussian noise on the trained factor (B, or A when B is frozen) and the head, at ``lam`` times the
    honest change's norm, module by module."""
    lora = {}
    for m, f0 in payload.lora.items():
        f = update.lora[m]
        honest = product_norm(Factor(torch.cat([f.B, -f0.B], 1), torch.cat([f.A, f0.A], 0), f.scale))
        on_B = payload.train_B
        N = torch.randn(f0.B.shape if on_B else f0.A.shape, generator=generator, dtype=f0.B.dtype)
        unit = product_norm(Factor(N, f0.A, f.scale) if on_B else Factor(f0.B, N, f.scale))
        a = 0.0 if unit == 0 else lam * honest / unit
        lora[m] = Factor(f0.B + a * N, f0.A, f.scale) if on_B else Factor(f0.B, f0.A + a * N, f.scale)
    head = {}
    for n, h0 in payload.head.items():
        N = torch.randn(h0.shape, generator=generator, dtype=h0.dtype)
        head[n] = h0 + lam * float((update.head[n] - h0).norm()) / max(float(N.norm()), 1e-30) * N
    return dataclasses.replace(update, lora=lora, head=head)


def flip_labels(labels: Tensor, num_labels: int) -> Tensor:
    """y -> C - 1 - y (for two labels: 0 <-> 1)."""
    return (num_labels - 1) - labels


@dataclass
class Attack:
    """A run's attack: its kind, L and attackers (client ids)."""

    kind: str
    attackers: list[int]
    lam: float
    seed: int

    @classmethod
    def of(cls, kind: str, fraction: float, lam: float | None, clients: int, seed: int) -> "Attack | None":
        """The configured attack, or None for ``--attack none``."""
        if kind == "none":
            return None
        lam = DEFAULT_LAMBDA.get(kind, 0.0) if lam is None else lam
        return cls(kind, choose_attackers(clients, fraction, seed), lam, seed)

    def flips(self, client: int) -> bool:
        """Whether ``client`` trains on flipped labels."""
        return self.kind == "labelflip" and client in self.attackers

    def tamper(self, update: Update, payload: Payload, round: int) -> Update:
        """What client ``update.client`` uploads: its update, or the attacker's version of it."""
        if update.client not in self.attackers or self.kind == "labelflip":
            return update
        if self.kind == "noise":
            draws = torch.Generator().manual_seed(client_seed(self.seed, round, update.client, stream=3))
            return noise_change(update, payload, self.lam, draws)
        return scale_change(update, payload, -self.lam if self.kind == "signflip" else self.lam)

    def row(self, sampled: list[int], rejected: list[dict[str, Any]]) -> dict[str, list[int]]:
        """A round's detection record: the sampled attackers, and the rejected attackers (true rejections)
        and honest clients (false rejections)."""
        out = {r["client"] for r in rejected}
        present = [c for c in sampled if c in self.attackers]
        return {
            "attackers": present,
            "true_rejections": [c for c in present if c in out],
            "false_rejections": sorted(c for c in out if c not in self.attackers),
        }
