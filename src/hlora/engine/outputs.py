"""What every engine writes: one metrics row per round, and the final adapter and summary.

The embedded simulation and the Flower ServerApp both call these, so ``metrics.jsonl``,
``summary.json`` and ``adapter/`` mean the same thing whatever carried the messages.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from hlora.export import adapter_svd, energy_kept, save_peft_adapter, truncated
from hlora.factors import Adapter
from hlora.metrics import MetricsLog
from hlora.model import resolve_model_path
from hlora.provenance import summary_provenance
from hlora.server import RoundOutcome
from hlora.strategies import GlobalState, Strategy


def round_row(
    rnd: int,
    outcome: RoundOutcome,
    *,
    strategy: Strategy,
    evaluate: Callable[[Adapter, dict[str, Tensor]], dict[str, float]] | None,
    client_ranks: list[int],
    clients: list[int],
    ranks: list[int],
    started: float,
) -> dict[str, Any]:
    """Score the round's global model with ``evaluate(adapter, head)`` and build its ``metrics.jsonl`` row.

    ``clients`` and ``ranks`` are the round's sampled client ids and their ranks; ``started`` is the
    ``time.perf_counter()`` at the start of the round. ``client_train_loss`` maps each accepted client's
    id (as text; -1: centralized's pooled site) to its local training loss. Without an evaluation (no dev
    set, or a round that ``--eval-every`` skips) the row has no score keys (accuracy, eval_loss, ...): its
    communication, losses and times are still recorded.
    """
    state = outcome.state
    t_eval = time.perf_counter()
    adapter = strategy.global_adapter(state)
    scores = evaluate(adapter, state.head) if evaluate is not None else {}
    t_eval = time.perf_counter() - t_eval
    svds = adapter_svd(adapter)
    energy = {str(r): round(energy_kept(svds, r), 6) for r in sorted(set(client_ranks))}
    clipped = {"clipped": outcome.clipped} if outcome.clipped else {}  # --robust normclip's or DP's scaled clients
    if outcome.dp_clip is not None:  # the round's DP clip C (C_t with --dp-adaptive-clip)
        clipped["dp_clip"] = outcome.dp_clip
    return {
        "round": rnd,
        **scores,
        "train_loss": outcome.train_loss,
        "client_train_loss": {str(u.client): u.train_loss for u in outcome.accepted},
        "clients": clients,
        "ranks": ranks,
        "uplink_bytes": outcome.uplink_bytes,
        "downlink_bytes": outcome.downlink_bytes,
        "energy_kept": energy,
        "rejected": outcome.rejected,
        "skipped": outcome.skipped,
        **clipped,
        "seconds": time.perf_counter() - started,
        "seconds_train": outcome.seconds_train,
        "seconds_aggregate": outcome.seconds_aggregate,
        "seconds_eval": t_eval,
    }


def finish_run(
    out: Path,
    strategy: Strategy,
    state: GlobalState,
    log: MetricsLog,
    *,
    model: str,
    task: str,
    strategy_name: str,
    wall_seconds: float,
    task_type: str = "SEQ_CLS",
    predictions: Callable[[Adapter, dict[str, Tensor]], dict[str, list[int]]] | None = None,
    extra: dict[str, Any] | None = None,
    adapter: bool = True,
    code: list[dict[str, Any]],
) -> dict[str, Any]:
    """Write the final global model as a PEFT adapter (``out/adapter``; PEFT ``task_type`` SEQ_CLS or
    CAUSAL_LM), ``dev_predictions.json`` and then ``summary.json`` (a run with a summary is finished).
    ``adapter`` False: no ``out/adapter`` (a server that holds no model: fedsa on Flower), and the summary's
    ``adapter_rank`` is None.

    ``predictions(adapter, head)`` gives the ``predicted`` and ``gold`` dev labels of a classifier (None: an
    LM, or no dev set); it sees the global adapter the last round evaluated (the last round always is).
    ``extra``: more summary keys (e.g. DP's final ``dp_epsilon``). ``code``: the provenance of each part of
    the run (:func:`hlora.provenance.segments`, taken when it started).
    """
    full = strategy.global_adapter(state)
    rank = None
    if adapter:
        written, _ = truncated(adapter_svd(full), None)
        save_peft_adapter(out / "adapter", written, state.head, resolve_model_path(model), task_type)
        rank = max(f.rank for f in written.values())
    if predictions is not None:
        log.predictions(state.round, **predictions(full, state.head))
    return log.summary(task=task, strategy=strategy_name, wall_seconds=wall_seconds, adapter_rank=rank,
                       **(extra or {}), provenance=summary_provenance(code))
