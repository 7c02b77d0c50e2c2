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
3. Evaluate the global model on the dev set (every ``eval-every`` rounds and after the last; with
   ``evaluate-on`` clients or both, every client's node also scores it on the share of its data it holds
   out: :func:`client_evaluation`), write
   ``metrics.jsonl`` and ``checkpoint.pt``; at the end, ``adapter/``, ``dev_predictions.json`` and
   ``summary.json``, all in ``out`` (see :mod:`hlora.engine.outputs`); with ``log``, the rows and the summary
   in TensorBoard, MLflow or W&B too (:mod:`hlora.tracking`).

``strategy = "fedsa"`` (personalised: each node keeps its own B and head in its run state): the server holds
A only, so it scores no model of its own and writes no adapter; each evaluated round every client's node
scores its own model on its held-out share (:mod:`hlora.engine.flower.personal`), and ``resume`` is refused.

``task = "instruct"`` (a decoder LM on instruction JSONL): the nodes report no labels or label counts, no
logit adjustment is sent, and the server scores eval loss, perplexity and ROUGE-L (``gen-samples``) on its dev
file, as :func:`hlora.tasks.score` does for ``hlora run``; the adapter is a ``CAUSAL_LM`` one. With
``evaluate-on`` clients or both the nodes score the eval loss on their held-out shares (no ROUGE-L: no
generation on a node), and the rows get ``client_eval_loss`` and ``client_perplexity``.

``resume = "OUT"`` continues a stopped run from its ``checkpoint.pt`` (the global state, the sampler,
the rows so far and each client's site), with the run-config it started with (kept in ``flower.json``
and sent to the nodes in every message): the server waits for the run's nodes, gives each client back to
the node of its site (:func:`rejoin`), and runs the remaining rounds.

Besides the outputs of ``hlora run``, ``out/flower.json`` maps client ids to node ids (and keeps the
run-config), and with
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
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from hlora.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from hlora.config import ConfigError, RunConfig, load_config
from hlora.data import Encoded, EncodedLM
from hlora.engine.flower.personal import check_personal, personal_evaluation
from hlora.engine.flower.records import TrainSettings, payload_to_record, record_to_update, with_run_config
from hlora.engine.flower.settings import (
    FLOWER_JSON,
    FlowerOptions,
    resumed_run_config,
    run_settings,
    shared_task,
)
from hlora.engine.flower.transport import NodeFailure, NodeUnavailable, exchange
from hlora.engine.outputs import finish_run, round_row
from hlora.engine.simulation import default_out, prepare_out
from hlora.factors import Adapter, Factor, init_factors
from hlora.metrics import MetricsLog, dev_predictions, evaluate, evaluate_lm, perplexity
from hlora.model import FederatedModel
from hlora.precision import resolve_precision
from hlora.privacy import DP
from hlora.provenance import segments
from hlora.server import RoundOutcome, client_seed, server_round
from hlora.strategies import ClientSpec, GlobalState, Payload, Strategy, StrategyError, Update, get_strategy
from hlora.tasks import is_lm, load_model, peft_task_type, score, tokenize
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

    #: None: a client of a resumed run whose site has not come back (unreachable)
    node_id: int | None
    rank: int
    lora_alpha: float
    num_examples: int
    #: its share of the run's task, -1 when it reads its own data file
    partition_id: int = -1
    #: how many of its training examples have each label (None: not reported, an older node)
    label_counts: list[int] | None = None
    #: the precision it trains at (``auto`` resolved on the node)
    precision: str = "fp32"
    #: the round from which it is sampled: 1 for the nodes that answered at the start (or ``resume``)
    joined: int = 1

    @classmethod
    def of(cls, record: dict[str, Any]) -> Node:
        """A node as ``flower.json`` or a checkpoint keeps it."""
        return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls) if f.name in record})

    def site(self) -> tuple:
        """What identifies the site behind a node across restarts (its node id may change): its share or
        data, rank and alpha."""
        return (self.partition_id, self.rank, self.lora_alpha, self.num_examples, self.label_counts)


def discover(
    grid: Grid, expected: int, labels: list[str], options: FlowerOptions, run_config: dict[str, Any],
    need_counts: bool = False,
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
    return query(grid, ids, labels, options, run_config, need_counts)


def query(
    grid: Grid, ids: list[int], labels: list[str], options: FlowerOptions, run_config: dict[str, Any],
    need_counts: bool = False,
) -> tuple[list[Node], dict[int, str]]:
    """Query the nodes ``ids``; return the usable ones in client order and why others are not."""
    contents = [(i, with_run_config(RecordDict({"hlora": ConfigRecord({})}), run_config)) for i in ids]
    replies = exchange(grid, contents, "query", timeout=options.round_timeout)
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
        self, grid: Grid, cfg: RunConfig, node_ids: dict[int, int | None], rnd: int, timeout: float,
        label_counts: list[int] | None = None, run_config: dict[str, Any] | None = None,
    ) -> None:
        self.grid, self.cfg, self.node_ids, self.rnd, self.timeout = grid, cfg, node_ids, rnd, timeout
        self.label_counts = label_counts
        self.run_config = run_config
        self.pairs: list[tuple[ClientSpec, Payload]] = []
        self.results: list[Update | Exception] = []

    def __call__(self, pairs: list[tuple[ClientSpec, Payload]]) -> list[Update | Exception]:
        self.pairs = pairs
        contents = []
        adjust = 0.0 if is_lm(self.cfg) else self.cfg.logit_adjust  # an LM has no labels (as in hlora run)
        for spec, payload in pairs:
            settings = TrainSettings(
                client=spec.id, round=self.rnd, seed=client_seed(self.cfg.seed, self.rnd, spec.id),
                local_epochs=self.cfg.local_epochs, lr=self.cfg.client_lr(self.rnd),
                batch_size=self.cfg.batch_size, local_steps=self.cfg.local_steps, prox_mu=self.cfg.prox_mu,
                logit_adjust=adjust,
                label_counts=self.label_counts if adjust else None,
                head_opt=self.cfg.head_opt, head_lr=self.cfg.head_lr, client_opt=self.cfg.client_opt,
                adam_eps=self.cfg.adam_eps,
            )
            content = payload_to_record(payload, settings)
            if self.run_config is not None:
                with_run_config(content, self.run_config)
            contents.append((self.node_ids[spec.id], content))
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
    """The whole run; returns the summary (also written to ``out/summary.json``).

    With ``resume = "OUT"``, the stopped run in OUT continues from its last checkpoint (see
    :func:`resumed_run_config`): the rounds after it are run again and give the metrics the run would have
    given uninterrupted, when its nodes (the same sites: the same share of data and rank) come back.
    """
    t_run = time.perf_counter()
    run_config = dict(run_config)
    resume = str(run_config.get("resume", "") or "").strip()
    if resume:
        run_config, ignored = resumed_run_config(run_config)
        if ignored:
            log.warning("hlora: resuming: the stopped run's run-config is used, not this one's %s",
                        ", ".join(ignored))
    cfg, options = run_settings(run_config)
    strategy = get_strategy(cfg.strategy, **cfg.strategy_options)
    if strategy.pools_clients:
        raise ConfigError(f"strategy {cfg.strategy} pools the sites' data in one place: use hlora run")
    check_personal(strategy, cfg, options, resumed=bool(resume))
    check_installed(cfg.log)
    out = Path(resume).expanduser().resolve() if resume else None
    saved_cfg = load_config(out / "config.yaml", {}) if out else None
    threads = (saved_cfg.threads if saved_cfg else None) or cfg.threads
    if threads:
        torch.set_num_threads(threads)
    cfg.threads = threads or torch.get_num_threads()
    if out is None:
        target = Path(cfg.out) if cfg.out else default_out(cfg)
        if any((target / name).exists() for name in ("config.yaml", "metrics.jsonl", "summary.json")):
            raise ConfigError(f"run-config out {target.resolve()} already holds a run; choose another directory, "
                              f'or continue it with resume="{target.resolve()}"')
        out = prepare_out(target).resolve()
    cfg.out = run_config["out"] = str(out)
    task = shared_task(cfg, options.labels, with_dev=True)
    lm = is_lm(cfg)  # --task instruct: a causal LM (dtype, gradient-checkpointing), no labels, no head
    labels = [] if lm else list(task.label_names)  # what the nodes report
    adjust = 0.0 if lm else cfg.logit_adjust  # logit adjustment: a classifier's only
    attention = cfg.attention
    model, tokenizer = load_model(cfg, task)  # the server only evaluates: its dropout never runs
    cfg.attention = attention  # config.yaml keeps the run-config's: auto is each machine's own choice
    fm = FederatedModel(model, cfg.target_modules)
    cfg.robust_rule().check_dense(fm.shapes, cfg.per_round)  # median/trimmed: refused where they do not fit
    cfg.privacy().check_dense(fm.shapes, cfg.strategy)  # DP's dense noisy change: likewise
    dev = tokenize(task, tokenizer, task.dev, cfg.max_length) if len(task.dev) else None
    # a resumed run evaluates at the precision it chose at its start
    cfg.precision = fm.precision = saved_cfg.precision if saved_cfg else server_precision(cfg, fm, dev)

    def scorer(adapter: Adapter, head: dict[str, Tensor]) -> dict[str, float]:
        """Accuracy (and F1); for an LM eval loss, perplexity and ROUGE-L (gen-samples), as hlora run."""
        return score(cfg, task, fm, tokenizer, adapter, head, task.dev, dev)

    checkpoint = load_checkpoint(out) if resume and (out / CHECKPOINT).exists() else None
    if resume:
        roster = [Node.of(n) for n in (checkpoint[1]["roster"] if checkpoint else
                                      json.loads((out / FLOWER_JSON).read_text())["clients"])]
        log.info("hlora: resuming %s at round %d; waiting for its %d nodes", out,
                 (checkpoint[0].round if checkpoint else 0) + 1, len(roster))
        found, failed = discover(grid, len(roster), labels, options, run_config,
                                 need_counts=bool(adjust))
        nodes = rejoin(roster, found)
        taken = {n.node_id for n in nodes}
        for extra in (n for n in found if n.node_id not in taken):  # asked again when the next round starts
            log.info("hlora: node %s is no client of the resumed run: it joins as a new one", extra.node_id)
    else:
        log.info("hlora: waiting for %d nodes; writing to %s", cfg.clients, out)
        nodes, failed = discover(grid, cfg.clients, labels, options, run_config,
                                 need_counts=bool(adjust))
    for reason in failed.values():
        log.warning("hlora: left out: %s", reason)
    online = [n for n in nodes if n.node_id is not None]
    if len(online) < cfg.per_round:
        why = "; ".join(failed.values()) or "none failed"
        raise ConfigError(f"{len(online)} usable nodes, fewer than per-round {cfg.per_round} ({why})")
    clients = client_specs(nodes, fm)
    strategy.check(clients)

    def roster_changed() -> tuple[dict[int, int | None], list[int] | None]:
        """The clients are ``nodes``: record them (config.yaml, flower.json); their node ids and label counts."""
        cfg.clients = len(nodes)
        cfg.client_ranks = [n.rank for n in nodes]
        cfg.ranks = ",".join(map(str, cfg.client_ranks))
        if cfg.dp_epsilon_target is not None:  # calibrate z for the clients that answered (q = per-round / them)
            cfg.dp_noise = None
        cfg.validate()
        cfg.save(out / "config.yaml")
        write_flower_json(out, run_config, nodes, failed, options)
        return {i: n.node_id for i, n in enumerate(nodes)}, federation_counts(nodes) if adjust else None

    node_ids, counts = roster_changed()
    # DP: the accountant's sampling rate q = per-round / clients is fixed by the first roster, so a DP run
    # takes no late joiners (its z and epsilon hold for the clients it started with)
    dp = cfg.privacy()
    sampler = np.random.default_rng([cfg.seed, 2])
    if checkpoint is not None:
        state, saved = checkpoint
        if saved["client_ranks"] != cfg.client_ranks:
            raise ConfigError(f"run-config resume {out}: the checkpoint's client ranks {saved['client_ranks']} "
                              f"are not the nodes' {cfg.client_ranks}")
        sampler.bit_generator.state = saved["sampler"]
        rows, wall_before = saved["rows"], saved["wall_seconds"]
        code = segments(saved.get("provenance"), resumed=True)
    else:
        init = init_factors(fm.shapes, max(cfg.client_ranks), torch.Generator().manual_seed(cfg.seed))
        state, rows, wall_before = strategy.init_state(init, fm.head_state()), [], 0.0
        code = segments(None, resumed=False)
    metrics = MetricsLog(out, rows if resume else None, tracker=open_tracking(cfg, out, resume=bool(resume)))
    max_rank = max((f.rank for f in state.init.values() if isinstance(f, Factor)), default=max(cfg.client_ranks))
    key = "eval_loss" if lm else "accuracy"  # the main score of a row (summary.json: final_ and best_)
    if strategy.personal:  # no server score: the nodes' scores of their own models
        key = "personal_accuracy"
    client_key = "client_eval_loss" if lm else "client_accuracy"  # the nodes' main score (evaluate-on clients)
    for rnd in range(state.round + 1, cfg.rounds + 1):
        t0 = time.perf_counter()
        if rnd > 1 and not dp.on:  # nodes that connected since: sampled from this round on
            left_out = len(failed)
            joined = join_late(grid, nodes, failed, labels, options, run_config,
                               bool(adjust), max_rank, strategy, fm, rnd)
            if len(failed) > left_out and not joined:
                write_flower_json(out, run_config, nodes, failed, options)
            if joined:
                clients = client_specs(nodes, fm)
                node_ids, counts = roster_changed()
                for c in joined:
                    log.info("hlora: round %d: node %s joins as client %d (rank %d)", rnd, nodes[c].node_id, c,
                             nodes[c].rank)
        sampled = sorted(sampler.choice(cfg.clients, cfg.per_round, replace=False).tolist())
        specs = [clients[c] for c in sampled]
        execute = GridExecutor(grid, cfg, node_ids, rnd, options.round_timeout, counts, run_config)
        try:
            outcome = server_round(strategy, state, specs, execute, round=rnd, seed=cfg.seed,
                                   min_clients=cfg.min_clients, max_norm_ratio=cfg.max_norm_ratio,
                                   server_opt=cfg.server_optimizer(), client_weights=cfg.client_weights,
                                   robust=cfg.robust_rule(), dp=dp)
        except NodeUnavailable:
            if not all(isinstance(r, NodeUnavailable) for r in execute.results):
                raise
            outcome = unreachable_round(strategy, state, execute, dp)
        if options.save_updates:
            (out / "updates").mkdir(exist_ok=True)
            torch.save({"round": rnd, "clients": specs, "before": state, "updates": outcome.accepted,
                        "after": outcome.state}, out / "updates" / f"round-{rnd}.pt")
        state = outcome.state
        for r in outcome.rejected:
            r["node_id"] = node_ids.get(r["client"])
        due = rnd % cfg.eval_every == 0 or rnd == cfg.rounds
        # a personalised strategy's server holds A only (B = 0): no model of its own to score on the dev set
        scored = dev is not None and options.evaluate_on != "clients" and due and not strategy.personal
        row = round_row(rnd, outcome, strategy=strategy, evaluate=scorer if scored else None,
                        client_ranks=cfg.client_ranks, clients=sampled,
                        ranks=[cfg.client_ranks[c] for c in sampled], started=t0)
        row["nodes"] = [node_ids[c] for c in sampled]
        if strategy.personal:  # the server's adapter has B = 0: its spectrum says nothing of the clients' models
            row.pop("energy_kept")
        if dp.on:  # epsilon spent so far at dp-delta (None: no noise, unbounded)
            row["dp_epsilon"] = dp.epsilon(cfg.per_round / cfg.clients, rnd)
        if options.clients_evaluate and due:
            row.update(client_evaluation(grid, strategy, state, node_ids, rnd, cfg, options, run_config))
        if strategy.personal and due:  # each node scores its own model on its held-out share
            row.update(personal_evaluation(grid, strategy, state, clients, node_ids, rnd, cfg, options, run_config))
        metrics.append(row)
        save_checkpoint(out, state, sampler=sampler.bit_generator.state, rows=metrics.rows,
                        client_ranks=cfg.client_ranks, partition=[], roster=[dataclasses.asdict(n) for n in nodes],
                        wall_seconds=wall_before + time.perf_counter() - t_run, provenance=code)
        log.info("hlora: round %d/%d %s %s %s %s train_loss %s rejected %d%s (%.1f s)", rnd, cfg.rounds,
                 key, _fmt(row.get(key)), client_key, _fmt(row.get(client_key)), _fmt(row["train_loss"]),
                 len(outcome.rejected), " skipped" if outcome.skipped else "", row["seconds"])
        for f in row.get("client_eval_failed", []) + row.get("personal_eval_failed", []):
            log.warning("hlora: round %d: client %s (node %s) did not evaluate: %s", rnd, f["client"], f["node"],
                        f["reason"])
        for r in outcome.rejected:
            log.warning("hlora: round %d: client %s (node %s) rejected: %s", rnd, r["client"], r["node_id"],
                        r["reason"])
    def predictions(adapter: Adapter, head: dict[str, Tensor]) -> dict[str, list[int]]:
        return dev_predictions(fm, adapter, head, dev, cfg.eval_batch_size)

    server_scores = dev is not None and options.evaluate_on != "clients" and not strategy.personal
    summary = finish_run(out, strategy, state, metrics, model=cfg.model, task=task.name,
                         strategy_name=cfg.strategy, wall_seconds=wall_before + time.perf_counter() - t_run,
                         task_type=peft_task_type(cfg), predictions=predictions if server_scores and not lm else None,
                         extra=dp.summary(cfg.per_round / cfg.clients, cfg.rounds),
                         adapter=not strategy.personal,  # fedsa: the server has A only, no model to export
                         code=code)
    by_clients = [r[client_key] for r in metrics.rows if client_key in r]
    if by_clients:  # the nodes' score of the global model, next to the server's (an LM's loss: best is lowest)
        summary.update({f"final_{client_key}": by_clients[-1],
                        f"best_{client_key}": (min if lm else max)(by_clients)})
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    metrics.tracker.finish()
    log.info("hlora: done; final %s %s; outputs in %s", key, _fmt(summary.get(f"final_{key}")), out)
    return summary


def client_evaluation(
    grid: Grid, strategy: Strategy, state: GlobalState, node_ids: dict[int, int | None], rnd: int,
    cfg: RunConfig, options: FlowerOptions, run_config: dict[str, Any],
) -> dict[str, Any]:
    """Every client's node scores the global model on the share of its data it holds out (an ``evaluate``
    message holding the global adapter and head); the row's keys are :func:`client_eval_row`'s."""
    payload = Payload(strategy.global_adapter(state), state.head)
    contents = []
    for c, node in node_ids.items():
        settings = TrainSettings(client=c, round=rnd, seed=0, local_epochs=0, lr=0.0, batch_size=cfg.eval_batch_size)
        contents.append((node, with_run_config(payload_to_record(payload, settings), run_config)))
    replies = exchange(grid, contents, "evaluate", timeout=options.round_timeout, group_id=f"{rnd}-evaluate")
    return client_eval_row(node_ids, replies, lm=is_lm(cfg))


def client_eval_row(
    node_ids: dict[int, int | None], replies: list[Message | Exception], lm: bool,
) -> dict[str, Any]:
    """The row's keys from the nodes' replies to an ``evaluate`` message, one per client of ``node_ids`` in its
    order (a reply, or the exception of a node that did not answer). ``client_eval_loss``: the nodes' eval losses
    weighted by their numbers of held-out examples; with it ``client_accuracy`` (weighted likewise) for a
    classifier, ``client_perplexity`` = exp(client_eval_loss) for an LM (``lm``: --task instruct).
    ``client_eval``: each node's client, node id, examples and scores (accuracy, eval_loss and F1; an LM's
    eval_loss only); ``client_eval_failed`` (client, node, reason): the nodes that did not answer, or
    answered without these scores."""
    need = ("eval_loss",) if lm else ("accuracy", "eval_loss")
    scores, failed = [], []
    for (c, node), reply in zip(node_ids.items(), replies):
        try:
            if isinstance(reply, Exception):
                raise reply
            got = reply.content.config_records["eval"]
            if int(got["client"]) != c or int(got["examples"]) < 1:
                raise NodeFailure(f"node {node} answered for client {got['client']} with {got['examples']} examples")
            missing = [k for k in need if k not in got]
            if missing:
                raise NodeFailure(f"node {node} answered without {', '.join(missing)}")
            keys = [*need, *(k for k in ("f1",) if k in got and not lm)]
            scores.append({"client": c, "node": node, "examples": int(got["examples"]),
                           **{k: float(got[k]) for k in keys}})
        except Exception as e:  # noqa: BLE001 - a node's failure is recorded, the run goes on
            failed.append({"client": c, "node": node, "reason": f"{type(e).__name__}: {e}"})
    row: dict[str, Any] = {}
    if scores:
        n = sum(s["examples"] for s in scores)
        if not lm:
            row["client_accuracy"] = sum(s["accuracy"] * s["examples"] for s in scores) / n
        row["client_eval_loss"] = sum(s["eval_loss"] * s["examples"] for s in scores) / n
        if lm:
            row["client_perplexity"] = perplexity(row["client_eval_loss"])
    row["client_eval"] = scores
    if failed:
        row["client_eval_failed"] = failed
    return row


def client_specs(nodes: list[Node], fm: FederatedModel) -> list[ClientSpec]:
    """Client i is ``nodes[i]``: its rank in every adapted layer, alpha and examples."""
    return [ClientSpec(i, dict.fromkeys(fm.shapes, n.rank), n.lora_alpha, n.num_examples) for i, n in enumerate(nodes)]


def join_late(
    grid: Grid, nodes: list[Node], failed: dict[int, str], labels: list[str], options: FlowerOptions,
    run_config: dict[str, Any], need_counts: bool, max_rank: int, strategy: Strategy, fm: FederatedModel,
    rnd: int,
) -> list[int]:
    """Query the nodes that connected since the last look (neither clients nor left out); each usable one
    becomes a client, with the rank it declares, from round ``rnd`` on: the client of a resumed run whose
    site it is (:func:`rejoin`), else a new client (appended to ``nodes``). A node is left out (``failed``,
    with the reason) when its answer is unusable, its rank is above ``max_rank`` (the rank of the shared
    initialisation, fixed at round 1) or the strategy refuses it. Returns the clients that joined."""
    known = {n.node_id for n in nodes if n.node_id is not None} | set(failed)
    ids = sorted(set(grid.get_node_ids()) - known)
    if not ids:
        return []
    found, why = query(grid, ids, labels, options, run_config, need_counts)
    before = set(failed)
    failed.update(why)
    joined = []
    for node in found:
        gap = next((i for i, n in enumerate(nodes) if n.node_id is None and n.site() == node.site()), None)
        if gap is not None:
            nodes[gap] = dataclasses.replace(node, joined=nodes[gap].joined)
            joined.append(gap)
            continue
        if node.rank > max_rank:
            failed[node.node_id] = (f"node {node.node_id}: rank {node.rank} is above the run's largest rank "
                                    f"{max_rank} (its shared initialisation's, fixed at round 1)")
            continue
        node = dataclasses.replace(node, joined=rnd)
        try:
            strategy.check(client_specs([*nodes, node], fm))
        except StrategyError as e:
            failed[node.node_id] = f"node {node.node_id}: {e}"
            continue
        nodes.append(node)
        joined.append(len(nodes) - 1)
    for node_id in set(failed) - before:
        log.warning("hlora: round %d: left out: %s", rnd, failed[node_id])
    return joined


def rejoin(roster: list[Node], found: list[Node]) -> list[Node]:
    """The clients of a resumed run: client i is the node whose site (share of data, rank, alpha) is client
    i's in the stopped run (:meth:`Node.site`; the first such node in client order), or, when none has come
    back, client i's record with no node (``node_id`` None: unreachable until one does)."""
    free = list(found)
    nodes = []
    for saved in roster:
        match = next((n for n in free if n.site() == saved.site()), None)
        if match is None:
            nodes.append(dataclasses.replace(saved, node_id=None))
        else:
            free.remove(match)
            nodes.append(dataclasses.replace(match, joined=saved.joined))
    return nodes


def write_flower_json(
    out: Path, run_config: dict[str, Any], nodes: list[Node], failed: dict[int, str], options: FlowerOptions
) -> None:
    """``OUT/flower.json``: each client's node and what it reported, the nodes left out and why, and the
    run-config (a resumed run's nodes get it from the server)."""
    (out / FLOWER_JSON).write_text(json.dumps({
        "clients": [{"client": i, **dataclasses.asdict(n)} for i, n in enumerate(nodes)],
        "left_out": [{"node_id": k, "reason": v} for k, v in failed.items()],
        "round_timeout": options.round_timeout,
        "run_config": run_config,
    }, indent=2) + "\n")


def server_precision(cfg: RunConfig, fm: FederatedModel, dev: Encoded | EncodedLM | None) -> str:
    """The server's evaluation precision: the run-config's, or for ``auto`` its own choice, timing the
    evaluation of a few dev batches (fp32 without a dev set; an LM's eval loss, without generation)."""
    if cfg.precision != "auto":
        return cfg.precision
    if dev is None:
        return "fp32"
    n = min(len(dev), 2 * cfg.eval_batch_size)
    adapter = init_factors(fm.shapes, 1, torch.Generator().manual_seed(0))
    if isinstance(dev, EncodedLM):
        probe_lm = EncodedLM(dev.input_ids[:n], dev.labels[:n], dev.prompt_lengths[:n], dev.pad_id)

        def step_lm(mode: str) -> None:
            fm.precision = mode
            evaluate_lm(fm, adapter, probe_lm, cfg.eval_batch_size, None, [], 0, 1)

        return resolve_precision("auto", step_lm)
    probe = Encoded(dev.input_ids[:n], None if dev.token_type_ids is None else dev.token_type_ids[:n],
                    dev.labels[:n], dev.pad_id)

    def step(mode: str) -> None:
        fm.precision = mode
        evaluate(fm, adapter, fm.head_state(), probe, cfg.eval_batch_size)

    return resolve_precision("auto", step)


def unreachable_round(strategy: Strategy, state: GlobalState, execute: GridExecutor, dp: DP) -> RoundOutcome:
    """Every sampled node was unreachable or silent: a network problem, not a bug, so the round is
    skipped (the global model kept, and under DP the clip C_t too) and the run goes on. (``server_round``
    raises when every client fails, because in one process that is a bug.)"""
    rejected = [{"client": spec.id, "reason": f"training failed: {type(e).__name__}: {e}"}
                for (spec, _), e in zip(execute.pairs, execute.results)]
    down = sum(strategy.downlink_bytes(state, payload) for _, payload in execute.pairs)
    return RoundOutcome(dataclasses.replace(state, round=state.round + 1), [], rejected, downlink_bytes=down,
                        skipped=True, dp_clip=dp.clip_at(state) if dp.on else None)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
