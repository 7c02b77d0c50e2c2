"""Split a training set across clients: IID, label-skewed (Dirichlet, pathological, shard), by a column's
natural ids, or size-skewed.

The names and parameters are flwr-datasets' partitioners' (``DirichletPartitioner``, ``IidPartitioner``,
``PathologicalPartitioner``, ``ShardPartitioner``, ``NaturalIdPartitioner``, ``SizePartitioner``), but the
code is a few lines of numpy over the label list that hlora already holds in memory, not a call into
flwr-datasets, for three reasons:

* flwr-datasets partitions a ``datasets.Dataset``; hlora's examples are plain lists, tokenized once, and
  only the indices of each client are needed. Building an Arrow table to read back index lists is the
  longer way round.
* Every split here must be *complete*: every example in exactly one client, and no client empty.
  flwr-datasets drops data in some settings (the pathological split's unused labels, the shard split's
  incomplete shard) and raises where hlora can still give every client data.
* flwr-datasets 0.6 requires ``datasets<5`` (and 0.5: ``datasets<=3.1``), which the environment's hub
  support (``datasets`` 5) and Flower 1.42 do not share; it is not installable beside them.

Each function's docstring says where it follows flwr-datasets and where it departs from it.
"""

from __future__ import annotations

import numpy as np

#: the partition methods; ``natural:COLUMN`` is written with its column
METHODS = ("iid", "dirichlet", "pathological", "shard", "size", "natural:COLUMN")


class PartitionError(ValueError):
    """Parameters that cannot split this data (K above the number of labels, a missing column, ...)."""


def partition(
    labels: list[int],
    num_clients: int,
    method: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    *,
    classes_per_client: int = 2,
    shards_per_client: int = 2,
    size_exponent: float = 1.0,
    groups: list[str] | None = None,
) -> list[list[int]]:
    """Indices of each client's examples (sorted). Every example goes to exactly one client; none is empty.

    ``dirichlet``: for each class c, proportions q_c ~ Dir(alpha, ..., alpha) over the clients, and the
    class's examples (shuffled) are cut in those proportions (Hsu et al., 2019). Small alpha, strong
    skew. ``iid``: a shuffled, near-equal split. ``pathological``, ``shard``, ``size``: see
    :func:`pathological`, :func:`shard`, :func:`size_skew`. ``natural:COLUMN``: one client per distinct
    value of ``groups`` (the column's values, one per example), see :func:`natural`.

    Raises :class:`PartitionError` (a ``ValueError``) when the parameters cannot split this data.
    """
    n = len(labels)
    if num_clients < 1:
        raise PartitionError("need at least one client")
    if method.startswith("natural:"):
        if groups is None:
            raise PartitionError(f"--partition {method} needs the column's values")
        return natural(groups, num_clients, method.partition(":")[2])
    if n < num_clients:
        raise PartitionError(f"{n} training examples cannot give {num_clients} clients one each")
    rng = np.random.default_rng(seed)
    if method == "iid":
        parts = [p.tolist() for p in np.array_split(rng.permutation(n), num_clients)]
    elif method == "dirichlet":
        if alpha <= 0:
            raise PartitionError("the Dirichlet alpha must be > 0")
        y = np.asarray(labels)
        parts = [[] for _ in range(num_clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            q = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(q)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
    elif method == "pathological":
        parts = pathological(labels, num_clients, classes_per_client, rng)
    elif method == "shard":
        parts = shard(labels, num_clients, shards_per_client, rng)
    elif method == "size":
        sizes = size_skew(n, num_clients, size_exponent, seed)
        perm = rng.permutation(n)
        parts = [p.tolist() for p in np.split(perm, np.cumsum(sizes)[:-1])]
    else:
        raise PartitionError(f"unknown partition {method!r}; choose {', '.join(METHODS)}")
    for client in range(num_clients):
        if not parts[client]:
            donor = max(range(num_clients), key=lambda j: len(parts[j]))
            parts[client].append(parts[donor].pop())
    return [sorted(int(i) for i in p) for p in parts]


def pathological(labels: list[int], num_clients: int, k: int, rng: np.random.Generator) -> list[list[int]]:
    """Each client holds (at most) ``k`` labels: flwr-datasets' ``PathologicalPartitioner`` with
    ``num_classes_per_partition=k`` and ``class_assignment_mode="first-deterministic"`` (Li et al., 2021,
    "Federated Learning on Non-IID Data Silos").

    Client i's first label is label ``i mod L`` (L labels, sorted); its other k - 1 are drawn at random
    without repeats. Each label's examples (shuffled) are then cut into near-equal chunks, one per client
    that holds it. One departure, for completeness: where flwr-datasets leaves a label that no client drew
    unused (its examples dropped, with a warning), here the other labels are drawn from the labels no
    client holds yet first, so every label is held once clients x k >= L; fewer slots are refused. A
    client whose labels' chunks are all empty (a label with fewer examples than holders) takes one example
    from the largest client, so it holds one label.
    """
    y = np.asarray(labels)
    classes = np.unique(y)
    L = len(classes)
    if k < 1:
        raise PartitionError(f"--classes-per-client must be at least 1, got {k}")
    if k > L:
        raise PartitionError(f"--classes-per-client {k} is above the {L} labels of the training set")
    if num_clients * k < L:
        raise PartitionError(
            f"--partition pathological: {num_clients} clients x {k} labels cannot hold all {L} labels "
            "(every example must go to a client); raise --clients or --classes-per-client"
        )
    held: list[list[int]] = [[int(classes[i % L])] for i in range(num_clients)]
    unheld = [int(c) for c in rng.permutation(classes[num_clients:])] if num_clients < L else []
    for client in range(num_clients):
        while len(held[client]) < k:
            fresh = [c for c in unheld if c not in held[client]]
            if fresh:
                c = fresh[0]
                unheld.remove(c)
            else:
                c = int(rng.choice([c for c in classes if c not in held[client]]))
            held[client].append(c)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in classes:
        holders = [i for i in range(num_clients) if c in held[i]]
        idx = rng.permutation(np.flatnonzero(y == c))
        for client, chunk in zip(holders, np.array_split(idx, len(holders))):
            parts[client].extend(chunk.tolist())
    return parts


def shard(labels: list[int], num_clients: int, shards_per_client: int, rng: np.random.Generator
          ) -> list[list[int]]:
    """McMahan et al.'s (2017) shards: flwr-datasets' ``ShardPartitioner`` with
    ``num_shards_per_partition=shards_per_client``.

    The examples are sorted by label (stable: ties keep the file's order), cut into
    clients x shards_per_client consecutive shards, and each client gets shards_per_client of them at
    random. A shard may straddle two labels at a label boundary. One departure, for completeness: the
    shards are cut with ``np.array_split`` (sizes differ by at most one example) instead of
    flwr-datasets' floor(n / shards) size, which drops the remainder.
    """
    if shards_per_client < 1:
        raise PartitionError(f"--shards-per-client must be at least 1, got {shards_per_client}")
    n, total = len(labels), num_clients * shards_per_client
    if total > n:
        raise PartitionError(
            f"--partition shard: {num_clients} clients x {shards_per_client} shards is above the {n} "
            "training examples (a shard needs one)"
        )
    order = np.argsort(np.asarray(labels), kind="stable")
    shards = np.array_split(order, total)
    assignment = rng.permutation(total).reshape(num_clients, shards_per_client)
    return [np.concatenate([shards[s] for s in row]).tolist() for row in assignment]


def size_skew(n: int, num_clients: int, exponent: float, seed: int) -> list[int]:
    """Client sizes drawn from a power law, summing to ``n``, each at least one (seeded).

    Weights w_k = 1 + Pareto(exponent) draws (density ∝ w^-(exponent + 1) on w >= 1: a smaller exponent,
    a heavier tail, more skew), and client k gets n_k ≈ n w_k / sum(w): one example each, the rest in
    proportion to w_k by largest remainders. flwr-datasets has no power-law size partitioner: its
    ``SizePartitioner`` takes the sizes, and its ``Linear``/``Square``/``ExponentialPartitioner`` tie them
    to the client id; this is the draw of LEAF and FedProx (Li et al., 2020), fed to the same idea. The
    examples themselves are then assigned IID (a shuffled cut in these sizes).
    """
    if exponent <= 0:
        raise PartitionError(f"--size-exponent must be > 0, got {exponent}")
    if n < num_clients:
        raise PartitionError(f"{n} training examples cannot give {num_clients} clients one each")
    w = 1.0 + np.random.default_rng([seed, 2]).pareto(exponent, size=num_clients)
    share = (n - num_clients) * w / w.sum()
    sizes = np.floor(share).astype(int)
    left = (n - num_clients) - sizes.sum()
    sizes[np.argsort(-(share - sizes), kind="stable")[:left]] += 1
    return (sizes + 1).tolist()


def natural(groups: list[str], num_clients: int, column: str = "") -> list[list[int]]:
    """One client per distinct value of a column (a site, an author): flwr-datasets'
    ``NaturalIdPartitioner(partition_by=COLUMN)``. Client i holds the examples of the i-th value in sorted
    order, as there. The number of clients must equal the number of distinct values.
    """
    values = sorted(set(groups))
    where = f" of column {column!r}" if column else ""
    if num_clients != len(values):
        more = "more" if num_clients > len(values) else "fewer"
        raise PartitionError(
            f"--partition natural:{column}: --clients {num_clients} is {more} than the {len(values)} distinct "
            f"values{where}; use --clients {len(values)}"
        )
    index = {v: i for i, v in enumerate(values)}
    parts: list[list[int]] = [[] for _ in values]
    for i, g in enumerate(groups):
        parts[index[g]].append(i)
    return parts
