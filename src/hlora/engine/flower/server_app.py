"""The hlora ServerApp: the federated rounds of ``hlora run``, with Flower carrying the messages.

1. Wait for ``clients`` nodes, ask each (a query message) for its rank, LoRA alpha, number of examples,
   label names and label counts (their sum is the federation's label prior, sent to every node for
   ``logit-adjust``, as the simulation computes it from all training labels). Client ids are the
   answering nodes in the order of their ``partition-id`` when every one holds a share of the run's task
   (so client i is the simulation's client i, with its data and its seeds), otherwise in the order of
   their node ids.
2. Each round: sample ``per-round`` clients (seeded, as the simulation does) and call
   :func:`hlora.server.server_round` (with the run's server optimizer) with an executor that sends each
   client its payload (a train message of its own rank, with the round's lr, ``local-steps``,
   ``prox-mu``, ``logit-adjust`` and the federation's label counts), and turns each reply into an
   :class:`~hlora.strategies.Update`, or an error reply, an offline node or a missing reply (after
   ``round-timeout``) into an exception that ``server_round`` records as rejected. The round goes on
   with the replies that arrived, when at least ``min-clients`` are valid.
3. Evaluate the global model on the dev set (every ``eval-every`` rounds and after the last), write
   ``metrics.jsonl`` and ``checkpoint.pt``; at the end, ``adapter/``, ``dev_predictions.json`` and
   ``summary.json``, all in ``out`` (see :mod:`hlora.engine.outputs`); with ``log``, the rows and the summary
   in TensorBoard, MLflow or W&B too (:mod:`hlora.tracking`).

Besides the outputs of ``hlora run``, ``out/flower.json`` maps client ids to node ids, and with
``save-updates = true`` ``out/updates/round-N.pt`` holds each round's previous state, accepted updates
and new state (``torch.load(..., weights_only=False)``). ``precision = "auto"`` is each machine's own
choice: ``config.yaml`` records the server's (its evaluation), ``flower.json`` each node's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from hlora.checkpoint import save_checkpoint
from hlora.config import ConfigError, RunConfig
from hlora.data import Encoded, encode
from hlora.engine.flower.records import TrainSettings, payload_to_record, record_to_update
from hlora.engine.flower.settings import FlowerOptions, run_settings, shared_task
from hlora.engine.flower.transport import NodeFailure, NodeUnavailable, exchange
from hlora.engine.outputs import finish_run, round_row
from hlora.engine.simulation import default_out, prepare_out
from hlora.factors import Adapter, init_factors
from hlora.metrics import MetricsLog, dev_predictions, evaluate
from hlora.model import FederatedModel, configure, load_classifier
from hlora.precision import resolve_precision
from hlora.server import RoundOutcome, client_seed, server_round
from hlora.strategies import ClientSpec, GlobalState, Payload, Strategy, Update, get_strategy
from hlora.tracking import check_installed, open_tracking

log = logging.getLogger("flwr.hlora")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run-config."""
    run_federation(grid, dict(context.run_config))


@dataclass
class Node:
    """A node that answered the query: its id and what it reported."""

    node_id: int
    rank: int
    lora_alpha: float
    num_examples: int
    #: its share of the run's task, -1 when it reads its own data file
    partition_id: int = -1
    #: how many of its training examples have each label (None: not reported, an older node)
    label_counts: list[int] | None = None
    #: the precision it trains at (``auto`` resolved on the node)
    precision: str = "fp32"


def discover(
    grid: Grid, expected: int, labels: list[str], options: FlowerOptions, need_counts: bool = False
) -> tuple[list[Node], dict[int, str]]:
    """Wait for ``expected`` nodes, query them; return the usable ones in client order and why others are not.

    ``need_counts``: a node must report its label counts (for logit adjustment).
    """
    deadline = time.monotonic() + options.node_timeout
    while len(ids := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise ConfigError(f"only {len(ids)} of the {expected} nodes (run-config clients) connected "
                              f"within {options.node_timeout:g} s (run-config node-timeout)")
        time.sleep(1.0)
    replies = exchange(grid, [(i, RecordDict({"hlora": ConfigRecord({})})) for i in ids], "query",
                       timeout=options.round_timeout)
    nodes, failed = [], {}
    for node_id, reply in zip(ids, replies):
        if isinstance(reply, NodeFailure):
            failed[node_id] = str(reply)
            continue
        try:
            site = reply.content.config_records["site"]
            counts = [int(c) for c in site["label-counts"]] if "label-counts" in site else None
            node = Node(node_id, int(site["rank"]), float(site["lora-alpha"]), int(site["num-examples"]),
                        int(site.get("partition-id", -1)), counts, str(site.get("precision", "fp32")))
            if list(site["labels"]) != labels:
                raise ValueError(f"its labels {list(site['labels'])} differ from the server's {labels}")
            if counts is None and need_counts:
                raise ValueError("it reports no label counts (logit-adjust needs them; an older hlora?)")
            if counts is not None and (len(counts) != len(labels) or min(counts) < 0):
                raise ValueError(f"its label counts {counts} do not fit the {len(labels)} labels")
        except (KeyError, TypeError, ValueError) as e:
            failed[node_id] = f"node {node_id}: unusable answer to the query: {e}"
            continue
        nodes.append(node)
    return in_client_order(nodes), failed


def in_client_order(nodes: list[Node]) -> list[Node]:
    """Client i is the node with partition id i when every node holds a distinct share of the run's task
    (the simulation's client i: the same data and seeds); otherwise the nodes in the order of their ids."""
    parts = [n.partition_id for n in nodes]
    if min(parts, default=-1) >= 0 and len(set(parts)) == len(parts):
        return sorted(nodes, key=lambda n: n.partition_id)
    return sorted(nodes, key=lambda n: n.node_id)


def federation_counts(nodes: list[Node]) -> list[int]:
    """The federation's training label counts: the sum of the nodes' counts."""
    return [sum(c) for c in zip(*(n.label_counts or [] for n in nodes))]


class GridExecutor:
    """An :data:`~hlora.server.Executor` over a Flower Grid: one train message per client.

    ``label_counts``: the federation's label counts, sent for logit adjustment (None: not sent).
    """

    def __init__(
        self, grid: Grid, cfg: RunConfig, node_ids: dict[int, int], rnd: int, timeout: float,
        label_counts: list[int] | None = None,
    ) -> None:
        self.grid, self.cfg, self.node_ids, self.rnd, self.timeout = grid, cfg, node_ids, rnd, timeout
        self.label_counts = label_counts
        self.pairs: list[tuple[ClientSpec, Payload]] = []
        self.results: list[Update | Exception] = []

    def __call__(self, pairs: list[tuple[ClientSpec, Payload]]) -> list[Update | Exception]:
        self.pairs = pairs
        contents = []
        for spec, payload in pairs:
            settings = TrainSettings(
                client=spec.id, round=self.rnd, seed=client_seed(self.cfg.seed, self.rnd, spec.id),
                local_epochs=self.cfg.local_epochs, lr=self.cfg.client_lr(self.rnd),
                batch_size=self.cfg.batch_size, local_steps=self.cfg.local_steps, prox_mu=self.cfg.prox_mu,
                logit_adjust=self.cfg.logit_adjust,
                label_counts=self.label_counts if self.cfg.logit_adjust else None,
                head_opt=self.cfg.head_opt, head_lr=self.cfg.head_lr, client_opt=self.cfg.client_opt,
                adam_eps=self.cfg.adam_eps,
            )
            contents.append((self.node_ids[spec.id], payload_to_record(payload, settings)))
        results: list[Update | Exception] = []
        replies = exchange(self.grid, contents, "train", timeout=self.timeout, group_id=str(self.rnd))
        for (spec, _), reply in zip(pairs, replies):
            if isinstance(reply, Exception):
                results.append(reply)
                continue
            try:
                update = record_to_update(reply.content)
            except Exception as e:  # noqa: BLE001 - a malformed reply is that client's fault
                results.append(e)
                continue
            if update.client != spec.id:
                node = self.node_ids[spec.id]
                results.append(NodeFailure(f"node {node} answered for client {update.client}"))
                continue
            results.append(update)
        self.results = results
        return results


def run_federation(grid: Grid, run_config: dict[str, Any]) -> dict[str, Any]:
    """The whole run; returns the summary (also written to ``out/summary.json``)."""
    t_run = time.perf_counter()
    cfg, options = run_settings(run_config)
    check_installed(cfg.log)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    else:
        cfg.threads = torch.get_num_threads()
    strategy = get_strategy(cfg.strategy, **cfg.strategy_options)
    if strategy.pools_clients:
        raise ConfigError(f"strategy {cfg.strategy} pools the sites' data in one place: use hlora run")
    if strategy.personal:
        raise ConfigError(f"strategy {cfg.strategy} keeps each client's state between rounds, which Flower nodes "
                          "do not do yet: use hlora run")
    target = Path(cfg.out) if cfg.out else default_out(cfg)
    if any((target / name).exists() for name in ("config.yaml", "metrics.jsonl", "summary.json")):
        raise ConfigError(f"run-config out {target.resolve()} already holds a run; choose another directory")
    out = prepare_out(target).resolve()
    cfg.out = str(out)
    task = shared_task(cfg, options.labels, with_dev=True)
    model, tokenizer = load_classifier(cfg.model, task.num_labels, cfg.seed)
    configure(model, cfg.dropout, cfg.attention)  # the server only evaluates: its dropout never runs
    fm = FederatedModel(model, cfg.target_modules)
    cfg.robust_rule().check_dense(fm.shapes, cfg.per_round)  # median/trimmed: refused where they do not fit
    cfg.privacy().check_dense(fm.shapes)  # DP's dense noisy change: likewise
    dev = encode(tokenizer, task.dev, cfg.max_length) if len(task.dev) else None
    cfg.precision = fm.precision = server_precision(cfg, fm, dev)

    def scorer(adapter: Adapter, head: dict[str, Tensor]) -> dict[str, float]:
        return evaluate(fm, adapter, head, dev, cfg.eval_batch_size, task.f1_label)
    log.info("hlora: waiting for %d nodes; writing to %s", cfg.clients, out)

    nodes, failed = discover(grid, cfg.clients, list(task.label_names), options,
                             need_counts=bool(cfg.logit_adjust))
    for reason in failed.values():
        log.warning("hlora: left out: %s", reason)
    if len(nodes) < cfg.per_round:
        why = "; ".join(failed.values()) or "none failed"
        raise ConfigError(f"{len(nodes)} usable nodes, fewer than per-round {cfg.per_round} ({why})")
    clients = [ClientSpec(i, dict.fromkeys(fm.shapes, n.rank), n.lora_alpha, n.num_examples)
               for i, n in enumerate(nodes)]
    strategy.check(clients)
    node_ids = {i: n.node_id for i, n in enumerate(nodes)}
    cfg.clients = len(clients)
    cfg.client_ranks = [n.rank for n in nodes]
    cfg.ranks = ",".join(map(str, cfg.client_ranks))
    if cfg.dp_epsilon_target is not None:  # calibrate z again for the clients that answered (q = per-round / them)
        cfg.dp_noise = None
    cfg.validate()
    dp = cfg.privacy()
    cfg.save(out / "config.yaml")
    (out / "flower.json").write_text(json.dumps({
        "clients": [{"client": i, "node_id": n.node_id, "rank": n.rank, "lora_alpha": n.lora_alpha,
                     "num_examples": n.num_examples, "partition_id": n.partition_id,
                     "label_counts": n.label_counts, "precision": n.precision} for i, n in enumerate(nodes)],
        "left_out": [{"node_id": k, "reason": v} for k, v in failed.items()],
        "round_timeout": options.round_timeout,
    }, indent=2) + "\n")

    counts = federation_counts(nodes) if cfg.logit_adjust else None
    init = init_factors(fm.shapes, max(cfg.client_ranks), torch.Generator().manual_seed(cfg.seed))
    state = strategy.init_state(init, fm.head_state())
    sampler = np.random.default_rng([cfg.seed, 2])
    metrics = MetricsLog(out, tracker=open_tracking(cfg, out, resume=False))
    for rnd in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        sampled = sorted(sampler.choice(cfg.clients, cfg.per_round, replace=False).tolist())
        specs = [clients[c] for c in sampled]
        execute = GridExecutor(grid, cfg, node_ids, rnd, options.round_timeout, counts)
        try:
            outcome = server_round(strategy, state, specs, execute, round=rnd, seed=cfg.seed,
                                   min_clients=cfg.min_clients, max_norm_ratio=cfg.max_norm_ratio,
                                   server_opt=cfg.server_optimizer(), client_weights=cfg.client_weights,
                                   robust=cfg.robust_rule(), dp=dp)
        except NodeUnavailable:
            if not all(isinstance(r, NodeUnavailable) for r in execute.results):
                raise
            outcome = unreachable_round(strategy, state, execute)
        if options.save_updates:
            (out / "updates").mkdir(exist_ok=True)
            torch.save({"round": rnd, "clients": specs, "before": state, "updates": outcome.accepted,
                        "after": outcome.state}, out / "updates" / f"round-{rnd}.pt")
        state = outcome.state
        for r in outcome.rejected:
            r["node_id"] = node_ids.get(r["client"])
        scored = dev is not None and (rnd % cfg.eval_every == 0 or rnd == cfg.rounds)
        row = round_row(rnd, outcome, strategy=strategy, evaluate=scorer if scored else None,
                        client_ranks=cfg.client_ranks, clients=sampled,
                        ranks=[cfg.client_ranks[c] for c in sampled], started=t0)
        row["nodes"] = [node_ids[c] for c in sampled]
        if dp.on:  # epsilon spent so far at dp-delta (None: no noise, unbounded)
            row["dp_epsilon"] = dp.epsilon(cfg.per_round / cfg.clients, rnd)
        metrics.append(row)
        save_checkpoint(out, state, sampler=sampler.bit_generator.state, rows=metrics.rows,
                        client_ranks=cfg.client_ranks, partition=[], wall_seconds=time.perf_counter() - t_run)
        log.info("hlora: round %d/%d accuracy %s train_loss %s rejected %d%s (%.1f s)", rnd, cfg.rounds,
                 _fmt(row.get("accuracy")), _fmt(row["train_loss"]), len(outcome.rejected),
                 " skipped" if outcome.skipped else "", row["seconds"])
        for r in outcome.rejected:
            log.warning("hlora: round %d: client %s (node %s) rejected: %s", rnd, r["client"], r["node_id"],
                        r["reason"])
    def predictions(adapter: Adapter, head: dict[str, Tensor]) -> dict[str, list[int]]:
        return dev_predictions(fm, adapter, head, dev, cfg.eval_batch_size)

    summary = finish_run(out, strategy, state, metrics, model=cfg.model, task=task.name,
                         strategy_name=cfg.strategy, wall_seconds=time.perf_counter() - t_run,
                         predictions=predictions if dev is not None else None,
                         extra={"dp_epsilon": dp.epsilon(cfg.per_round / cfg.clients, cfg.rounds),
                                "dp_delta": cfg.dp_delta, "dp_noise": cfg.dp_noise} if dp.on else None)
    metrics.tracker.finish()
    log.info("hlora: done; final accuracy %.4f; outputs in %s", summary["final_accuracy"], out)
    return summary


def server_precision(cfg: RunConfig, fm: FederatedModel, dev: Encoded | None) -> str:
    """The server's evaluation precision: the run-config's, or for ``auto`` its own choice, timing the
    evaluation of a few dev batches (fp32 without a dev set)."""
    if cfg.precision != "auto":
        return cfg.precision
    if dev is None:
        return "fp32"
    n = min(len(dev), 2 * cfg.eval_batch_size)
    probe = Encoded(dev.input_ids[:n], None if dev.token_type_ids is None else dev.token_type_ids[:n],
                    dev.labels[:n], dev.pad_id)
    adapter = init_factors(fm.shapes, 1, torch.Generator().manual_seed(0))

    def step(mode: str) -> None:
        fm.precision = mode
        evaluate(fm, adapter, fm.head_state(), probe, cfg.eval_batch_size)

    return resolve_precision("auto", step)


def unreachable_round(strategy: Strategy, state: GlobalState, execute: GridExecutor) -> RoundOutcome:
    """Every sampled node was unreachable or silent: a network problem, not a bug, so the round is
    skipped (the global model kept) and the run goes on. (``server_round`` raises when every client
    fails, because in one process that is a bug.)"""
    rejected = [{"client": spec.id, "reason": f"training failed: {type(e).__name__}: {e}"}
                for (spec, _), e in zip(execute.pairs, execute.results)]
    down = sum(strategy.downlink_bytes(state, payload) for _, payload in execute.pairs)
    return RoundOutcome(dataclasses.replace(state, round=state.round + 1), [], rejected, downlink_bytes=down,
                        skipped=True)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
