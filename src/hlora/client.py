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


def make_optimizer(
    params: list[torch.nn.Parameter], head_ids: set[int], lr: float, head_opt: str = "adamw",
    head_lr: float | None = None, client_opt: str = "adamw", adam_eps: float = 1e-8,
) -> "torch.optim.Optimizer | _Both":
    """The client's optimizer: ``client_opt`` (adamw, or plain sgd) for the adapters at ``lr``; the head
    (parameters whose id is in ``head_ids``) with ``head_opt`` (adamw, sgd) at ``head_lr`` (default lr), or
    ``frozen`` (not trained: FedBABU's head, kept at its seeded initialisation).

    Why SGD: Adam normalises each step to about lr whatever the gradient's size, so a client that holds
    one label moves the shared model at full speed even where logit adjustment has made its gradient
    tiny (its data is already explained by its label prior); SGD keeps each step proportional to the
    gradient, so such a client moves the model little. ``adam_eps`` in between: AdamW's step is
    lr * m / (sqrt(v) + eps), so gradients well below eps take steps proportional to them (SGD-like at
    lr / eps) while larger ones keep Adam's normalised steps.
    """
    head = [p for p in params if id(p) in head_ids]
    body = [p for p in params if id(p) not in head_ids]
    hlr = lr if head_lr is None else head_lr
    if head_opt == "frozen":
        head = []
    if client_opt == "adamw" and head_opt in ("adamw", "frozen") and hlr == lr:
        return torch.optim.AdamW(body + head, lr=lr, weight_decay=0.0, eps=adam_eps)

    def opt(kind: str, group: list[torch.nn.Parameter], rate: float) -> torch.optim.Optimizer | None:
        if not group:
            return None
        if kind == "adamw":
            return torch.optim.AdamW(group, lr=rate, weight_decay=0.0, eps=adam_eps)
        return torch.optim.SGD(group, lr=rate)

    return _Both(opt(client_opt, body, lr), opt(head_opt, head, hlr))


class _Both:
    """Optimizers stepped together (one for the adapters, one for the head)."""

    def __init__(self, *opts: torch.optim.Optimizer | None) -> None:
        self.opts = [o for o in opts if o is not None]

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)


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
    head_opt: str = "adamw",
    head_lr: float | None = None,
    client_opt: str = "adamw",
    adam_eps: float = 1e-8,
) -> Update:
    """Put the payload into the model, run AdamW over the client's examples, read out.

    The client trains ``epochs`` passes over its examples, or, with ``local_steps``, exactly that many
    optimizer steps, cycling its data (a new shuffle each pass). The adapters train with ``client_opt``
    (AdamW or SGD) at ``lr``, the head with ``head_opt`` at ``head_lr`` (see :func:`make_optimizer`). ``objective`` sets the loss (logit
    adjustment, proximal term; default plain cross-entropy). ``seed`` fixes the shuffling and dropout,
    so a client's round is the same whatever ran before it. ``on_batch(n)`` is called after each batch
    with the number of examples it held (progress). ``group_by_length`` batches examples of similar
    length together (less padding); otherwise batches are drawn at random.
    """
    objective = objective or Objective()
    params = fm.install(payload.lora, payload.head, payload.frozen, payload.train_A, payload.train_B)
    if head_opt == "frozen":  # no gradient for the head at all
        for p in fm.head_params.values():
            p.requires_grad_(False)
    optimizer = make_optimizer(params, set(map(id, fm.head_params.values())), lr, head_opt, head_lr, client_opt,
                               adam_eps)
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
