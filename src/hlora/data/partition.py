"""Split a training set across clients: IID, or label-skewed by a Dirichlet draw per class."""

from __future__ import annotations

import numpy as np


def partition(
    labels: list[int], num_clients: int, method: str = "dirichlet", alpha: float = 0.5, seed: int = 0
) -> list[list[int]]:
    """Indices of each client's examples. Every example goes to exactly one client; none is empty.

    ``dirichlet``: for each class c, proportions q_c ~ Dir(alpha, ..., alpha) over the clients, and the
    class's examples (shuffled) are cut in those proportions (Hsu et al., 2019). Small alpha, strong
    skew. ``iid``: a shuffled, near-equal split. An empty client takes one example from the largest.
    """
    n = len(labels)
    if num_clients < 1:
        raise ValueError("need at least one client")
    if n < num_clients:
        raise ValueError(f"{n} training examples cannot give {num_clients} clients one each")
    rng = np.random.default_rng(seed)
    if method == "iid":
        parts = [p.tolist() for p in np.array_split(rng.permutation(n), num_clients)]
    elif method == "dirichlet":
        if alpha <= 0:
            raise ValueError("the Dirichlet alpha must be > 0")
        y = np.asarray(labels)
        parts = [[] for _ in range(num_clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            q = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(q)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
    else:
        raise ValueError(f"unknown partition {method!r}; choose iid or dirichlet")
    for client in range(num_clients):
        if not parts[client]:
            donor = max(range(num_clients), key=lambda j: len(parts[j]))
            parts[client].append(parts[donor].pop())
    return [sorted(p) for p in parts]
