"""Client state that outlives a round: what a personalised strategy's clients keep between their rounds.

A personalised strategy (``Strategy.personal``, e.g. FedSA-LoRA: each client keeps its own B) says what a
client keeps (``keep``), how it trains from it (``personalise``) and what it sends (``share``); this module
holds the kept values in one place. The engine owns the store: the embedded simulation keeps every
client's entry in memory and saves the store in ``checkpoint.pt`` after each round, so a resumed run
continues with the same client states. A client never sampled before has no entry and starts from what
the server sends (for FedSA-LoRA the global initial B = 0).

Memory: the entries' tensors (:meth:`ClientStates.nbytes`); for FedSA-LoRA sum_m d_m r_k * 4 bytes a client
in float32 (about 147 KiB at MiniLM size and rank 8, 8 MiB at 7B shapes; see
:mod:`hlora.strategies.fedsa`).

Personalised evaluation needs data the client did not train on: :func:`split_holdout` takes a seeded
share of each client's examples out of its training set (only for a personalised strategy: every other
run's split is untouched).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from hlora.strategies import Payload, Strategy, Update

#: a client's kept values: nested dicts of tensors (FedSA-LoRA: {"B": {module: B}, "head": {name: W}})
Entry = dict[str, Any]


class ClientStates:
    """Each client's kept values, by client id; in memory, saved and restored through the checkpoint."""

    def __init__(self, entries: dict[int, Entry] | None = None) -> None:
        self.entries: dict[int, Entry] = dict(entries or {})

    def get(self, client: int) -> Entry | None:
        """What ``client`` kept from its last round (None: it was never sampled, or keeps nothing)."""
        return self.entries.get(client)

    def put(self, client: int, entry: Entry) -> None:
        if entry:
            self.entries[client] = entry

    def __contains__(self, client: int) -> bool:
        return client in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def nbytes(self) -> int:
        """Bytes of the kept tensors."""
        return sum(_nbytes(e) for e in self.entries.values())

    def state_dict(self) -> dict[int, Entry]:
        """For the checkpoint (``torch.save``-able with ``weights_only``: ints, strings, tensors)."""
        return {int(k): v for k, v in sorted(self.entries.items())}

    @classmethod
    def from_state_dict(cls, saved: dict[int, Entry] | None) -> "ClientStates":
        return cls({int(k): v for k, v in (saved or {}).items()})


def _nbytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def personal_round(
    strategy: Strategy, states: ClientStates, client: int, payload: Payload, train: Callable[[Payload], Update]
) -> Update:
    """The client's side of a round of a personalised strategy: train from the received payload with what
    it kept (``personalise``), keep its part of the result (``keep``, whatever the server then does with
    the update), and return what it sends (``share``). A client whose training raises keeps what it had."""
    update = train(strategy.personalise(payload, states.get(client)))
    states.put(client, strategy.keep(update))
    return strategy.share(update, payload)


def split_holdout(parts: list[list[int]], fraction: float, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Each client's examples split into (train, held-out): a seeded ``fraction`` of them (rounded, at least
    one when the client has two or more, never all) held out for its personalised evaluation.

    The draw of client k depends only on (seed, k) and its examples, not on the other clients
    (:func:`holdout_positions`: a Flower node holding partition k draws the same)."""
    train, held = [], []
    for k, part in enumerate(parts):
        keep, out = holdout_positions(len(part), fraction, [seed, 5, k])
        train.append([part[j] for j in keep])
        held.append([part[j] for j in out])
    return train, held


def holdout_positions(n: int, fraction: float, key: list[int]) -> tuple[list[int], list[int]]:
    """Which of a client's ``n`` examples it trains on and which it holds out, as ascending positions: a
    ``fraction`` of them (rounded, at least one when ``n`` >= 2, never all) drawn by ``np.random.default_rng(key)``.
    :func:`split_holdout` draws client k's with ``key = [seed, 5, k]``."""
    h = 0 if n < 2 else min(n - 1, max(1, round(fraction * n)))
    order = np.random.default_rng(key).permutation(n)
    out = set(order[:h].tolist())
    return [j for j in range(n) if j not in out], sorted(out)


def own_majority(labels: Sequence[int], train: list[list[int]], held: list[list[int]]) -> float | None:
    """Accuracy of each client predicting its own training share's most common label on its held-out share,
    over all held-out examples (None: nothing held out): under label skew, the line a personalised score must
    clear before it says more than "this client's data leans to one label". A tie (or an empty training share)
    goes to the label more common over all the training shares."""
    federation = Counter(int(labels[i]) for tr in train for i in tr)
    right = total = 0
    for tr, ho in zip(train, held):
        if not ho:
            continue
        counts = Counter(int(labels[i]) for i in tr)
        major = max(federation, key=lambda c: (counts[c], federation[c], -c))
        right += sum(int(labels[i]) == major for i in ho)
        total += len(ho)
    return right / total if total else None


def personal_scores(
    strategy: Any, state: Any, clients: list[Any], states: ClientStates, held: list[list[int]],
    correct: Callable[[Payload, int, list[int]], dict[str, int]],
) -> dict[str, Any]:
    """Each client's own model (``strategy.personal_model``) on its held-out examples: ``personal_accuracy``
    (over all held-out examples, i.e. the clients' accuracies weighted by their held-out counts),
    ``personal_examples`` and ``client_personal_accuracy`` {client id: accuracy}. ``correct(model, client,
    indices)`` counts the examples the model gets right, as {"personal_accuracy": count, ...}: every other
    key of it (e.g. ``personal_accuracy_prior``) is reported over all held-out examples too."""
    right: dict[str, int] = {}
    total = 0
    per_client = {}
    for spec in clients:
        idx = held[spec.id]
        if not idx:
            continue
        counts = correct(strategy.personal_model(state, spec, states.get(spec.id)), spec.id, idx)
        for key, c in counts.items():
            right[key] = right.get(key, 0) + c
        total += len(idx)
        per_client[str(spec.id)] = counts["personal_accuracy"] / len(idx)
    if not total:
        return {}
    return {**{key: c / total for key, c in right.items()}, "personal_examples": total,
            "client_personal_accuracy": per_client}
