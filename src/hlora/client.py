"""Local training of one client on the shared base model; returns its update."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hlora.data import Encoded
from hlora.model import FederatedModel
from hlora.strategies import Payload, Update


def train_client(
    fm: FederatedModel,
    payload: Payload,
    data: Encoded,
    indices: list[int],
    *,
    client_id: int,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    on_batch: Callable[[int], None] | None = None,
) -> Update:
    """Put the payload into the model, run ``epochs`` of AdamW over the client's examples, read out.

    ``seed`` fixes the shuffling and dropout, so a client's round is the same whatever ran before it.
    ``on_batch(n)`` is called after each batch with the number of examples it held (progress).
    """
    params = fm.install(payload.lora, payload.head, payload.frozen, payload.train_A)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    shuffle = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    fm.model.train()
    total, steps = 0.0, 0
    try:
        for _ in range(epochs):
            order = torch.randperm(len(indices), generator=shuffle).tolist()
            for start in range(0, len(order), batch_size):
                chunk = [indices[i] for i in order[start : start + batch_size]]
                loss = fm.model(**data.batch(chunk)).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                total += float(loss.detach())
                steps += 1
                if on_batch is not None:
                    on_batch(len(chunk))
        lora, head = fm.read()
    finally:
        fm.clear()
    return Update(
        client=client_id,
        lora=lora,
        head=head,
        num_examples=len(indices),
        info=dict(payload.info),
        train_loss=total / max(steps, 1),
    )
