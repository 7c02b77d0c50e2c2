"""A personalised strategy (``fedsa``) on Flower: what the server may run, and the nodes' personal scores.

FedSA-LoRA's clients keep their own B (and head) between their rounds. On Flower each node keeps its
entry in its run state (``context.state``, see :mod:`hlora.engine.flower.client_app`) and trains as
``hlora run``'s client does (:func:`hlora.client_state.personal_round`); the server holds the shared A
only (its B is 0), so it has no model to score on its dev set or to export. Instead, every evaluated
round, each client's node scores its own model (the received A with its kept B and head; a node that has
not trained yet: B = 0 and the initial head) on the share of its examples it holds out
(``personal-holdout``), and the row gets the simulation's keys: ``personal_accuracy`` (over all held-out
examples), ``personal_examples`` and ``client_personal_accuracy`` {client id: accuracy} (client id =
partition id when every node holds one).
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.serverapp import Grid

from hlora.config import ConfigError, RunConfig
from hlora.engine.flower.records import TrainSettings, payload_to_record, with_run_config
from hlora.engine.flower.settings import FlowerOptions
from hlora.engine.flower.transport import NodeFailure, exchange
from hlora.strategies import ClientSpec, GlobalState, Strategy


def check_personal(strategy: Strategy, cfg: RunConfig, options: FlowerOptions, resumed: bool) -> None:
    """Refuse, in one line, what a personalised strategy cannot do on Flower (``resumed``: run-config resume)."""
    if not strategy.personal:
        return
    if resumed:
        raise ConfigError(f"run-config resume: strategy {cfg.strategy}'s clients keep their state in their nodes' "
                          "run state, which a new Flower run does not have (they would restart from B = 0)")
    if options.clients_evaluate:
        raise ConfigError(f"run-config evaluate-on {options.evaluate_on}: strategy {cfg.strategy} has no global "
                          "model to score; each node scores its own on its personal-holdout share")
    if cfg.robust != "none":
        raise ConfigError(f"run-config robust: strategy {cfg.strategy} sends A only, so the server cannot form "
                          "the clients' changes of s B A")


def personal_evaluation(
    grid: Grid, strategy: Strategy, state: GlobalState, clients: list[ClientSpec], node_ids: dict[int, int | None],
    rnd: int, cfg: RunConfig, options: FlowerOptions, run_config: dict[str, Any],
) -> dict[str, Any]:
    """Every client's node scores its own model on its held-out share (an ``evaluate`` message holding what
    the strategy would send it, ``dispatch``; the node personalises it with what it kept). The row's
    ``personal_accuracy``, ``personal_examples`` and ``client_personal_accuracy`` (as
    :func:`hlora.client_state.personal_scores`, over the clients that answered and hold examples out), and
    ``personal_eval_failed`` (client, node, reason) for those that did not answer."""
    contents = []
    for spec in clients:
        payload = strategy.dispatch(state, spec, torch.Generator())
        settings = TrainSettings(client=spec.id, round=rnd, seed=0, local_epochs=0, lr=0.0,
                                 batch_size=cfg.eval_batch_size)
        contents.append((node_ids[spec.id], with_run_config(payload_to_record(payload, settings), run_config)))
    replies = exchange(grid, contents, "evaluate", timeout=options.round_timeout, group_id=f"{rnd}-personal")
    right = total = 0
    per_client: dict[str, float] = {}
    failed = []
    for spec, (node, _), reply in zip(clients, contents, replies):
        try:
            if isinstance(reply, Exception):
                raise reply
            got = reply.content.config_records["personal"]
            examples, correct = int(got["examples"]), int(got["correct"])
            if int(got["client"]) != spec.id or not 0 <= correct <= examples:
                raise NodeFailure(f"node {node} answered for client {got['client']} with {correct} of {examples}")
        except Exception as e:  # noqa: BLE001 - a node's failure is recorded, the run goes on
            failed.append({"client": spec.id, "node": node, "reason": f"{type(e).__name__}: {e}"})
            continue
        if examples:
            right, total = right + correct, total + examples
            per_client[str(spec.id)] = correct / examples
    row: dict[str, Any] = {}
    if total:
        row.update(personal_accuracy=right / total, personal_examples=total, client_personal_accuracy=per_client)
    if failed:
        row["personal_eval_failed"] = failed
    return row
