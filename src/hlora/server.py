"""One federated round on the server, whatever carries the messages.

dispatch (strategy) -> clients train (an executor: in-process, or Flower) -> checks (validate) ->
aggregate (strategy). The embedded simulation and the Flower ServerApp both call :func:`server_round`
with their own executor, so the server logic exists once.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hlora.privacy import (CLIP_KEY, CLIP_STREAM, DP, FACTOR_DP, clip_scales, noise_generator, parameter_changes,
                           private_factor_step, private_step)
from hlora.robust import Robust, Verdict, clip_update
from hlora.server_opt import ServerOpt
from hlora.strategies import ClientSpec, GlobalState, Payload, Strategy, Update
from hlora.validate import norm_outliers, update_problem

#: trains the given clients on their payloads; returns, in order, an Update or the Exception it raised
Executor = Callable[[list[tuple[ClientSpec, Payload]]], list["Update | Exception"]]


def client_seed(seed: int, round: int, client: int, stream: int = 0) -> int:
    """A seed per (run, round, client, stream): a client's round never depends on what ran before it.
    Stream 0 drives local training (shuffling, dropout), stream 1 the server's draws for the client, stream 3
    a simulated attacker's noise (:mod:`hlora.attacks`), stream 4 with client -1 the server's DP noise of the
    round and stream 5 with client -1 the noise of its adaptive clipping count (:mod:`hlora.privacy`)."""
    return int(np.random.SeedSequence([seed, round, client + 1, stream]).generate_state(1)[0])


@dataclass
class RoundOutcome:
    state: GlobalState
    accepted: list[Update]
    rejected: list[dict[str, Any]] = field(default_factory=list)
    #: clients whose change the robust rule (normclip) or DP clipping scaled down: {"client": id, "scale": c}
    clipped: list[dict[str, Any]] = field(default_factory=list)
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    skipped: bool = False
    seconds_train: float = 0.0  # inside the executor: the clients' local training (and transport)
    seconds_aggregate: float = 0.0
    #: under DP, the clip C of the round (``--dp-adaptive-clip``: C_t); None without DP
    dp_clip: float | None = None

    @property
    def train_loss(self) -> float | None:
        n = sum(u.num_examples for u in self.accepted)
        return sum(u.train_loss * u.num_examples for u in self.accepted) / n if n else None


def server_round(
    strategy: Strategy,
    state: GlobalState,
    clients: list[ClientSpec],
    execute: Executor,
    *,
    round: int,
    seed: int,
    min_clients: int = 1,
    max_norm_ratio: float = 10.0,
    server_opt: ServerOpt | None = None,
    client_weights: str = "examples",
    robust: Robust | None = None,
    dp: DP | None = None,
) -> RoundOutcome:
    """Dispatch to ``clients``, let ``execute`` train them, reject bad updates, aggregate the rest.

    A client that raises, or whose update fails :func:`~hlora.validate.update_problem` or the norm
    check, is recorded in ``rejected`` and left out; so is one that the ``robust`` rule rejects (see
    :mod:`hlora.robust`; the clients whose change it scales down are listed in ``clipped``). Below
    ``min_clients`` valid updates the round is skipped and the global model stays as it was. ``server_opt``
    steps the global state with the round's aggregate (default: the strategy's own rule). ``client_weights``:
    ``examples`` weighs client k by p_k = n_k / n (every strategy's rule), ``uniform`` by 1/K (each accepted
    update counts as one example for the aggregation). When every client raises, the first error is raised:
    that is a bug or a setup error, not a client's fault.

    ``dp`` (on: :mod:`hlora.privacy`): every accepted change is clipped to ``dp.clip`` (listed in ``clipped``),
    each weighs 1 / len(clients) (the sampled clients, not the accepted ones), the noise is drawn from
    (``seed``, ``round``), and the state steps by :func:`~hlora.privacy.private_step`. The median-relative
    norm check and the robust rule are skipped: they make a client's weight depend on the others' updates.
    ``min_clients`` is not applied either: whether a round is skipped would depend on how many clients sent
    valid updates; a round with none releases the noise alone.
    """
    payloads = []
    down = 0
    for spec in clients:
        draws = torch.Generator().manual_seed(client_seed(seed, round, spec.id, stream=1))
        payloads.append(strategy.dispatch(state, spec, draws))
        down += strategy.downlink_bytes(state, payloads[-1])
    t0 = time.perf_counter()
    results = execute(list(zip(clients, payloads)))
    out = RoundOutcome(state, [], downlink_bytes=down, seconds_train=time.perf_counter() - t0)
    sent: list[Payload] = []
    failures = []
    for spec, payload, result in zip(clients, payloads, results):
        if isinstance(result, Exception):
            out.rejected.append({"client": spec.id, "reason": f"training failed: {type(result).__name__}: {result}"})
            failures.append(result)
            continue
        problem = update_problem(result, payload)
        out.uplink_bytes += _bytes(strategy, result)
        if problem is None:
            out.accepted.append(result)
            sent.append(payload)
        else:
            out.rejected.append({"client": spec.id, "reason": problem})
    if failures and len(failures) == len(clients):
        raise failures[0]
    private = dp is not None and dp.on
    if not private:
        sent = _reject(out, sent, norm_outliers(out.accepted, sent, max_norm_ratio))
    t0 = time.perf_counter()  # the robust rule is server work: timed with the aggregation
    if private:
        out.dp_clip = dp.clip_at(state)
        # a factor-space strategy's changes of the released factors: computed once, for the norms and the step
        changes = parameter_changes(strategy, state, out.accepted, sent) if strategy.name in FACTOR_DP else None
        verdict = Verdict(scales=clip_scales(out.accepted, sent, out.dp_clip, changes))
    else:
        verdict = (robust or Robust()).judge(out.accepted, sent)
    sent = _reject(out, sent, verdict.rejected)
    out.clipped = [{"client": c, "scale": s} for c, s in verdict.scales.items()]

    out.skipped = not private and len(out.accepted) < min_clients  # DP: never (see the docstring)
    if out.skipped:
        out.state = dataclasses.replace(state, round=state.round + 1)
    else:
        if private and strategy.name in FACTOR_DP:  # the clip scales each client's change of the release
            scales = [verdict.scales.get(u.client, 1.0) for u in out.accepted]
            out.state = private_factor_step(strategy, state, changes, scales, payloads[0], per_round=len(clients),
                                            std=dp.std(len(clients), out.dp_clip),
                                            generator=noise_generator(seed, round), opt=server_opt)
        else:
            weighed = [
                clip_update(u, p, verdict.scales[u.client], strategy.aggregates_products)
                if u.client in verdict.scales else u for u, p in zip(out.accepted, sent)
            ]
            if private:
                out.state = private_step(state, weighed, sent, per_round=len(clients),
                                         std=dp.std(len(clients), out.dp_clip),
                                         generator=noise_generator(seed, round), opt=server_opt)
            else:
                if client_weights == "uniform":
                    weighed = [dataclasses.replace(u, num_examples=1) for u in weighed]
                out.state = (server_opt or ServerOpt()).step(strategy, state, weighed, sent)
    if private and dp.adaptive is not None:  # C_{t+1}: the clients at or below C_t, counted with noise
        within = len(clients) - len(verdict.scales)  # a rejected client's change is 0: within C_t
        clip = dp.next_clip(out.dp_clip, within, len(clients), noise_generator(seed, round, CLIP_STREAM))
        out.state = dataclasses.replace(out.state, extra={**out.state.extra, CLIP_KEY: clip})
    out.seconds_aggregate = time.perf_counter() - t0
    return out


def _reject(out: RoundOutcome, sent: list[Payload], found: dict[int, str]) -> list[Payload]:
    """Move the accepted updates at the indices of ``found`` to ``rejected`` (with their reasons); return
    the payloads of the updates that stay."""
    out.rejected += [{"client": out.accepted[i].client, "reason": why} for i, why in found.items()]
    out.accepted = [u for i, u in enumerate(out.accepted) if i not in found]
    return [p for i, p in enumerate(sent) if i not in found]


def _bytes(strategy: Strategy, update: Update) -> int:
    """Bytes an update sent, or 0 when it is too broken to measure."""
    try:
        return strategy.uplink_bytes(update)
    except Exception:
        return 0
