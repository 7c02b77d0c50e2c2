"""The embedded simulation: one process, one frozen base model, clients as adapters that come and go.

config -> data (load, tokenize once, partition) -> clients (local training) -> strategy (aggregate,
dispatch) -> metrics. Read top to bottom, :func:`run` is the whole federated loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hlora.client import train_client
from hlora.config import ConfigError, RunConfig, draw_ranks
from hlora.data import encode, load_task, partition
from hlora.factors import init_factors
from hlora.metrics import MetricsLog, evaluate
from hlora.model import FederatedModel, load_classifier
from hlora.strategies import ClientSpec, Update, get_strategy


class Reporter:
    """Progress callbacks; the default one is silent (the CLI shows bars and round lines)."""

    def start(self, cfg: RunConfig, out: Path) -> None: ...
    def round_start(self, round: int, examples: int) -> None: ...
    def advance(self, examples: int) -> None: ...
    def round_end(self, row: dict[str, Any]) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...


@dataclass
class RunResult:
    out: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)


def client_seed(seed: int, round: int, client: int) -> int:
    """A seed per (run, round, client): a client's round never depends on what ran before it."""
    return int(np.random.SeedSequence([seed, round, client + 1]).generate_state(1)[0])


def default_out(cfg: RunConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.task}-{cfg.strategy}"


def prepare_out(out: Path) -> Path:
    """Create the run directory; refuse one that already holds a run (nothing is overwritten)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if any((out / name).exists() for name in ("config.yaml", "metrics.jsonl", "summary.json")):
        raise ConfigError(f"--out {out} already holds a run; choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def run(cfg: RunConfig, reporter: Reporter | None = None) -> RunResult:
    """Run a federated fine-tuning experiment as configured; write its outputs under ``cfg.out``."""
    reporter = reporter or Reporter()
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    strategy = get_strategy(cfg.strategy, **cfg.strategy_options)

    # data: load, tokenize once, partition
    task = load_task(cfg.task, cfg.train, cfg.dev, cfg.text_columns, cfg.label_column)
    if cfg.clients > len(task.train):
        raise ConfigError(f"--clients {cfg.clients} exceeds the {len(task.train)} training examples")
    model, tokenizer = load_classifier(cfg.model, task.num_labels, cfg.seed)
    fm = FederatedModel(model, cfg.target_modules)
    train = encode(tokenizer, task.train, cfg.max_length)
    dev = encode(tokenizer, task.dev, cfg.max_length)
    parts = partition(task.train.labels, cfg.clients, cfg.partition, cfg.alpha, cfg.seed)

    # clients: a rank each (fixed for the run), checked against the layers
    cfg.client_ranks = draw_ranks(cfg.ranks, cfg.clients, cfg.seed)
    width = min(min(shape) for shape in fm.shapes.values())
    if max(cfg.client_ranks) > width:
        raise ConfigError(f"rank {max(cfg.client_ranks)} is above the width {width} of the adapted layers")
    clients = [
        ClientSpec(i, dict.fromkeys(fm.shapes, r), cfg.lora_alpha, len(parts[i]))
        for i, r in enumerate(cfg.client_ranks)
    ]
    strategy.check(clients)
    max_rank = max(cfg.client_ranks)
    init = init_factors(fm.shapes, max_rank, torch.Generator().manual_seed(cfg.seed))
    state = strategy.init_state(init, fm.head_state())

    out = prepare_out(Path(cfg.out) if cfg.out else default_out(cfg))
    cfg.out = str(out)
    cfg.save(out / "config.yaml")
    log = MetricsLog(out)
    reporter.start(cfg, out)
    sampler = np.random.default_rng([cfg.seed, 2])
    t_run = time.perf_counter()

    for rnd in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        sampled = sorted(sampler.choice(cfg.clients, cfg.per_round, replace=False).tolist())
        if strategy.pools_clients:  # centralized: the round's data pooled at one site
            pooled = sorted(i for c in sampled for i in parts[c])
            jobs = [(ClientSpec(-1, dict.fromkeys(fm.shapes, max_rank), cfg.lora_alpha, len(pooled)), pooled)]
        else:
            jobs = [(clients[c], parts[c]) for c in sampled]
        reporter.round_start(rnd, cfg.local_epochs * sum(len(ix) for _, ix in jobs))

        updates: list[Update] = []
        up = down = 0
        for spec, indices in jobs:
            seed = client_seed(cfg.seed, rnd, spec.id)
            payload = strategy.dispatch(state, spec, torch.Generator().manual_seed(seed))
            down += strategy.downlink_bytes(state, payload)
            update = train_client(
                fm, payload, train, indices, client_id=spec.id, epochs=cfg.local_epochs,
                lr=cfg.lr, batch_size=cfg.batch_size, seed=seed, on_batch=reporter.advance,
            )
            up += strategy.uplink_bytes(update)
            updates.append(update)
        t_train = time.perf_counter() - t0

        t1 = time.perf_counter()
        state = strategy.aggregate(state, updates)
        t_agg = time.perf_counter() - t1
        t2 = time.perf_counter()
        scores = evaluate(fm, strategy.global_adapter(state), state.head, dev, cfg.eval_batch_size, task.f1_label)
        t_eval = time.perf_counter() - t2

        n = sum(u.num_examples for u in updates)
        row = {
            "round": rnd,
            **scores,
            "train_loss": sum(u.train_loss * u.num_examples for u in updates) / n,
            "clients": sampled,
            "ranks": [cfg.client_ranks[c] for c in sampled],
            "uplink_bytes": up,
            "downlink_bytes": down,
            "seconds": time.perf_counter() - t0,
            "seconds_train": t_train,
            "seconds_aggregate": t_agg,
            "seconds_eval": t_eval,
        }
        log.append(row)
        reporter.round_end(row)

    summary = log.summary(
        task=task.name, strategy=cfg.strategy, wall_seconds=time.perf_counter() - t_run
    )
    reporter.finish(summary)
    return RunResult(out, summary, log.rows)
