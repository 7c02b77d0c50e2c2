"""The hlora ClientApp: one site of a federation, run by a Flower SuperNode.

The site's ``--node-config`` gives its data (``data-file``, or ``partition-id`` and ``num-partitions``
of the run's task) and its LoRA ``rank`` (optionally ``lora-alpha``, a local ``model`` path, ``threads``).
The run-config (shared by every node and the server) gives the task, model and training settings.

* ``query``: answers the site's rank, LoRA alpha, number of training examples and label names.
* ``train``: trains the received factors with :func:`hlora.client.train_client`, exactly as the
  embedded simulation does, and replies with the update.

A bad node-config or unreadable data gives an error reply whose reason is one line.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from hlora.client import train_client
from hlora.config import ConfigError
from hlora.data import DataError, Encoded, TaskData, encode
from hlora.engine.flower.records import RecordError, record_to_payload, update_to_record
from hlora.engine.flower.settings import node_examples, node_settings, run_settings, shared_task
from hlora.model import FederatedModel, ModelError, load_classifier
from hlora.strategies import StrategyError

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


#: sites loaded by this process, by (run-config, node-config): a process that serves several
#: messages (or runs several nodes in simulation) loads the model and data once
_SITES: dict[tuple[str, str], Site] = {}


def load_site(context: Context) -> Site:
    """The node's model and data, loaded on first use (a ConfigError subclass with a one-line reason)."""
    key = (json.dumps(dict(context.run_config), sort_keys=True),
           json.dumps(dict(context.node_config), sort_keys=True))
    if key in _SITES:
        return _SITES[key]
    cfg, options = run_settings(context.run_config)
    node = node_settings(context.node_config, cfg)
    if node.threads or cfg.threads:
        torch.set_num_threads(node.threads or cfg.threads)
    task = shared_task(cfg, options.labels, with_dev=False)
    examples = node_examples(node, cfg, task)
    model, tokenizer = load_classifier(node.model or cfg.model, task.num_labels, cfg.seed)
    fm = FederatedModel(model, cfg.target_modules)
    width = min(min(shape) for shape in fm.shapes.values())
    if node.rank > width:
        raise ConfigError(f"node-config: rank {node.rank} is above the width {width} of the adapted layers")
    part = -1 if node.partition_id is None else node.partition_id
    site = Site(fm, encode(tokenizer, examples, cfg.max_length), task, node.rank, node.lora_alpha, part)
    _SITES[key] = site
    return site


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this site's rank, LoRA alpha, number of examples, label names and partition id."""

    def answer() -> RecordDict:
        site = load_site(context)
        return RecordDict({"site": ConfigRecord({
            "rank": site.rank,
            "lora-alpha": float(site.lora_alpha),
            "num-examples": len(site.data),
            "labels": list(site.task.label_names),
            "partition-id": site.partition_id,
        })})

    return _reply(msg, answer)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received factors on this site's data; reply with the update."""

    def answer() -> RecordDict:
        site = load_site(context)
        payload, settings = record_to_payload(msg.content)
        update = train_client(
            site.fm, payload, site.data, list(range(len(site.data))), client_id=settings.client,
            epochs=settings.local_epochs, lr=settings.lr, batch_size=settings.batch_size, seed=settings.seed,
        )
        return update_to_record(update)

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
