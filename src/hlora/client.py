"""Local training of one client on the shared base model; returns its update."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hlora.data import Encoded
from hlora.model import FederatedModel
from hlora.objectives import Objective
from hlora.strategies import Payload, Update


def length_grouped_batches(
    indices: list[int], lengths: list[int], batch_size: int, generator: torch.Generator, window: int = 32
) -> list[list[int]]:
    """Shuffled batches of examples of similar length (less padding, same examples per epoch).

    The client's examples are shuffled, cut into windows of ``window`` batches, sorted by length inside
    each window, cut into batches, and the batches are shuffled again.
    """
    order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
    if window <= 0:  # no grouping: plain random batches
        return [order[j : j + batch_size] for j in range(0, len(order), batch_size)]
    span = batch_size * window
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


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
    group_by_length: bool = True,
    local_steps: int | None = None,
    objective: Objective | None = None,
) -> Update:
    """Put the payload into the model, run AdamW over the client's examples, read out.

    The client trains ``epochs`` passes over its examples, or, with ``local_steps``, exactly that many
    optimizer steps, cycling its data (a new shuffle each pass). ``objective`` sets the loss (logit
    adjustment, proximal term; default plain cross-entropy). ``seed`` fixes the shuffling and dropout,
    so a client's round is the same whatever ran before it. ``on_batch(n)`` is called after each batch
    with the number of examples it held (progress). ``group_by_length`` batches examples of similar
    length together (less padding); otherwise batches are drawn at random.
    """
    objective = objective or Objective()
    params = fm.install(payload.lora, payload.head, payload.frozen, payload.train_A)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    shuffle = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    fm.model.train()
    total, steps = 0.0, 0
    window = 32 if group_by_length else 0
    if objective.prox_mu:
        objective.start, objective.start_head = payload.lora, payload.head

    def batches():
        passes = 0
        while local_steps is not None or passes < epochs:
            yield from length_grouped_batches(indices, data.lengths, batch_size, shuffle, window)
            passes += 1

    try:
        for chunk in batches():
            if local_steps is not None and steps >= local_steps:
                break
            batch = data.batch(chunk)
            with fm.autocast():
                out = fm.model(**batch)
            loss = out.loss if objective.offset is None else objective.data_loss(out.logits, batch["labels"])
            total += float(loss.detach())
            if payload.tail_penalty:
                loss = loss + payload.tail_penalty * fm.tail_norm()
            if objective.prox_mu:
                loss = loss + objective.proximal(fm.live_factors(), fm.head_params)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
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
