"""LoRA factors as plain tensors.

A LoRA adapter on a linear layer of weight W (d x k) adds the low-rank update

    dW = s * B @ A,        B: d x r,  A: r x k,  s = alpha / r  (the LoRA scaling)

to it. Everything the server touches is a :class:`Factor` per adapted module: no model, no file.
Throughout hlora the *effective update* ``s * B @ A`` is what a rule is stated and tested on, so
that clients with different alpha / r can never be mixed up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Factor:
    """One module's low-rank update ``scale * B @ A``."""

    B: Tensor  # d x r
    A: Tensor  # r x k
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]

    def delta(self) -> Tensor:
        """The dense update ``scale * B @ A`` (for tests and small layers only)."""
        return self.scale * (self.B @ self.A)

    def with_scale(self, scale: float) -> "Factor":
        """The same update expressed with another LoRA scaling (A absorbs the ratio)."""
        return Factor(self.B, self.A * (self.scale / scale), scale)


#: An adapter: module name -> its factor. Ranks may differ from module to module.
Adapter = dict[str, Factor]


def init_factors(
    shapes: dict[str, tuple[int, int]], rank: int, generator: torch.Generator
) -> Adapter:
    """A fresh adapter as PEFT initialises one: B = 0, A ~ kaiming_uniform(a=sqrt(5)).

    kaiming_uniform with a = sqrt(5) on an (r x k) matrix is U(-1/sqrt(k), 1/sqrt(k)).
    The generator makes the initialisation shared and reproducible (a seeded server draw).
    """
    out: Adapter = {}
    for name, (d, k) in shapes.items():
        r = min(rank, d, k)
        bound = 1.0 / math.sqrt(k)
        A = (torch.rand(r, k, generator=generator) * 2 - 1) * bound
        out[name] = Factor(torch.zeros(d, r), A, 1.0)
    return out


def tensor_bytes(*tensors: Tensor) -> int:
    """Bytes of the raw tensor data, as it crosses the wire."""
    return sum(t.numel() * t.element_size() for t in tensors)
