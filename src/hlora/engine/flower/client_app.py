"""The hlora ClientApp: one site of a federation, run by a Flower SuperNode.

The site's ``--node-config`` gives its data (``data-file``, or ``partition-id`` and ``num-partitions``
of the run's task) and its LoRA ``rank`` (optionally ``lora-alpha``, a local ``model`` path, ``threads``).
The run-config (shared by every node and the server) gives the task, model and training settings.

* ``query``: answers the site's rank, LoRA alpha, number of training examples, label names, label
  counts (the server sums them into the federation's prior, for logit adjustment) and precision.
* ``evaluate`` (run-config ``evaluate-on`` clients or both): scores the received global model on the
  seeded share of its examples the node holds out (``client-eval-fraction``; it trains on the rest).
* ``train``: trains the received factors with :func:`hlora.client.train_client`, exactly as the
  embedded simulation does (the round's lr, ``local-steps``, the objective: logit adjustment against
  the federation's label counts sent by the server, FedProx), and replies with the update.

Precision: the run-config's ``precision`` (``fp32``, ``bf16``) sets the node's autocast; ``auto`` is
the node's own choice, made once per run by :func:`hlora.precision.resolve_precision` timing a few
training batches on its data, and kept in the node's run state (``context.state``).

A bad node-config or unreadable data gives an error reply whose reason is one line.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from hlora.client import train_client
from hlora.config import ConfigError, RunConfig
from hlora.data import DataError, Encoded, TaskData, encode
from hlora.engine.flower.records import RecordError, TrainSettings, record_to_payload, update_to_record
from hlora.engine.flower.settings import held_out, node_examples, node_settings, run_settings, shared_task
from hlora.factors import init_factors
from hlora.metrics import evaluate
from hlora.model import FederatedModel, ModelError, configure, load_classifier
from hlora.objectives import Objective, label_counts, offset_from_counts
from hlora.precision import resolve_precision
from hlora.strategies import Payload, StrategyError

#: Flower's error code for an exception raised by a ClientApp
CLIENT_APP_RAISED_EXCEPTION = 2

log = logging.getLogger("flwr.hlora")

app = ClientApp()


@dataclass
class Site:
    """What a node loads once: the base model with LoRA slots, its tokenized data, its rank."""

    fm: FederatedModel
    data: Encoded
    task: TaskData
    rank: int
    lora_alpha: float
    #: the node's share of a split of the run's task (``partition-id``), or -1 for its own data file
    partition_id: int = -1
    #: how many of its training examples have each label, in label order
    label_counts: list[int] = field(default_factory=list)
    #: the share it holds out to score the global model (run-config evaluate-on clients or both), or None
    heldout: Encoded | None = None


#: sites loaded by this process, by (run-config, node-config): a process that serves several
#: messages (or runs several nodes in simulation) loads the model and data once
_SITES: dict[tuple[str, str], Site] = {}


def run_config_of(msg: Message, context: Context) -> dict[str, Any]:
    """The run's run-config: the one the server sends in the message (``run-config``: a resumed run's is
    the stopped run's), else the one Flower gives the node."""
    sent = msg.content.config_records.get("run-config")
    return dict(sent) if sent is not None else dict(context.run_config)


def load_site(context: Context, run_config: Mapping[str, Any] | None = None) -> Site:
    """The node's model and data, loaded on first use (a ConfigError subclass with a one-line reason).

    ``run_config``: the run's (see :func:`run_config_of`; None: the context's)."""
    run_config = dict(context.run_config if run_config is None else run_config)
    key = (json.dumps(run_config, sort_keys=True), json.dumps(dict(context.node_config), sort_keys=True))
    if key in _SITES:
        return _SITES[key]
    cfg, options = run_settings(run_config)
    node = node_settings(context.node_config, cfg)
    if node.threads or cfg.threads:
        torch.set_num_threads(node.threads or cfg.threads)
    task = shared_task(cfg, options.labels, with_dev=False)
    examples = node_examples(node, cfg, task)
    part = -1 if node.partition_id is None else node.partition_id
    heldout = None
    if options.clients_evaluate:  # only then: a run where the server evaluates trains on all of it
        examples, heldout = held_out(examples, options.client_eval_fraction, cfg.seed, part)
    model, tokenizer = load_classifier(node.model or cfg.model, task.num_labels, cfg.seed)
    configure(model, cfg.dropout, cfg.attention)  # attention auto: the node's own device decides
    fm = FederatedModel(model, cfg.target_modules)
    width = min(min(shape) for shape in fm.shapes.values())
    if node.rank > width:
        raise ConfigError(f"node-config: rank {node.rank} is above the width {width} of the adapted layers")
    counts = label_counts(examples.labels, task.num_labels).tolist()
    site = Site(fm, encode(tokenizer, examples, cfg.max_length), task, node.rank, node.lora_alpha, part,
                counts, None if heldout is None else encode(tokenizer, heldout, cfg.max_length))
    fm.precision = node_precision(site, cfg, context)
    _SITES[key] = site
    return site


#: the key of the node's run state (``context.state``) that keeps what it resolved once per run
STATE_KEY = "hlora-node"


def node_precision(site: Site, cfg: RunConfig, context: Context) -> str:
    """The run-config's precision; for ``auto``, the node's own choice (a few timed training batches),
    made on the run's first message and kept in ``context.state`` (Flower starts a new ClientApp
    process for every message)."""
    if cfg.precision != "auto":
        return cfg.precision
    kept = context.state.get(STATE_KEY)
    if isinstance(kept, ConfigRecord) and "precision" in kept:
        return str(kept["precision"])
    chosen = resolve_precision("auto", lambda mode: _probe_step(site, cfg, mode))
    context.state[STATE_KEY] = ConfigRecord({"precision": chosen})
    return chosen


def _probe_step(site: Site, cfg: RunConfig, precision: str, batches: int = 2) -> None:
    """A few training batches on the site's data at ``precision``, from a fresh adapter of its rank."""
    site.fm.precision = precision
    lora = init_factors(site.fm.shapes, site.rank, torch.Generator().manual_seed(0))
    train_client(site.fm, Payload(lora, site.fm.head_state()), site.data, list(range(len(site.data))),
                 client_id=-1, epochs=1, lr=cfg.lr, batch_size=cfg.batch_size, seed=0, local_steps=batches)


def objective(site: Site, settings: TrainSettings) -> Objective:
    """The round's training loss: the logit adjustment of this site's label counts against the
    federation's (``hlora.objectives.logit_offset``, as the simulation computes it) and FedProx."""
    offset = None
    if settings.logit_adjust:
        counts = settings.label_counts
        if not counts or len(counts) != site.task.num_labels:
            raise RecordError(f"logit-adjust needs the federation's {site.task.num_labels} label counts; "
                              f"the train message holds {counts!r}")
        offset = offset_from_counts(site.label_counts, counts, settings.logit_adjust)
    return Objective(offset=offset, prox_mu=settings.prox_mu)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this site's rank, LoRA alpha, number of examples, label names, partition id,
    label counts and precision."""

    def answer() -> RecordDict:
        site = load_site(context, run_config_of(msg, context))
        return RecordDict({"site": ConfigRecord({
            "rank": site.rank,
            "lora-alpha": float(site.lora_alpha),
            "num-examples": len(site.data),
            "labels": list(site.task.label_names),
            "partition-id": site.partition_id,
            "label-counts": list(site.label_counts),
            "precision": site.fm.precision,
        })})

    return _reply(msg, answer)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received factors on this site's data; reply with the update."""

    def answer() -> RecordDict:
        site = load_site(context, run_config_of(msg, context))
        payload, settings = record_to_payload(msg.content)
        update = train_client(
            site.fm, payload, site.data, list(range(len(site.data))), client_id=settings.client,
            epochs=settings.local_epochs, lr=settings.lr, batch_size=settings.batch_size, seed=settings.seed,
            local_steps=settings.local_steps, objective=objective(site, settings),
            head_opt=settings.head_opt, head_lr=settings.head_lr, client_opt=settings.client_opt,
            adam_eps=settings.adam_eps,
        )
        return update_to_record(update)

    return _reply(msg, answer)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Score the received global model (its adapter and head) on the share this site holds out (run-config
    ``evaluate-on`` clients or both); reply with the accuracy, eval loss (and F1) and the number of examples."""

    def answer() -> RecordDict:
        site = load_site(context, run_config_of(msg, context))
        if site.heldout is None:
            raise ConfigError("this node holds out no examples (run-config evaluate-on is server)")
        payload, settings = record_to_payload(msg.content)
        scores = evaluate(site.fm, payload.lora, payload.head, site.heldout, settings.batch_size,
                          site.task.f1_label)
        return RecordDict({"eval": ConfigRecord({"client": settings.client, "examples": len(site.heldout),
                                                 **scores})})

    return _reply(msg, answer)


def _reply(msg: Message, answer: Callable[[], RecordDict]) -> Message:
    """The answer as a reply, or an error reply whose reason is one line (a user mistake or a crash)."""
    try:
        return Message(answer(), reply_to=msg)
    except (ConfigError, DataError, ModelError, RecordError, StrategyError) as e:
        reason = str(e)
    except Exception as e:  # noqa: BLE001 - a bug or a broken environment: traceback in the node log
        log.error("hlora ClientApp failed:\n%s", traceback.format_exc())
        reason = f"{type(e).__name__}: {e}"
    reason = " ".join(reason.split())
    log.error("hlora ClientApp: %s", reason)
    return Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
