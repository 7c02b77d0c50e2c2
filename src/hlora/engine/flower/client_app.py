"""The hlora ClientApp: one site of a federation, run by a Flower SuperNode.

The site's ``--node-config`` gives its data (``data-file``, or ``partition-id`` and ``num-partitions``
of the run's task) and its LoRA ``rank`` (optionally ``lora-alpha``, a local ``model`` path, ``threads``,
and the node worker: ``worker``, ``worker-idle``, ``worker-dir``).
The run-config (shared by every node and the server) gives the task, model and training settings.

* ``query``: answers the site's rank, LoRA alpha, number of training examples, label names, label
  counts (the server sums them into the federation's prior, for logit adjustment) and precision.
* ``evaluate`` (run-config ``evaluate-on`` clients or both): scores the received global model on the
  seeded share of its examples the node holds out (``client-eval-fraction``; it trains on the rest): a
  classifier's accuracy, eval loss and F1, or for ``task = "instruct"`` the LM's eval loss and perplexity.
* ``train``: trains the received factors with :func:`hlora.client.train_client`, exactly as the
  embedded simulation does (the round's lr, ``local-steps``, the objective: logit adjustment against
  the federation's label counts sent by the server, FedProx), and replies with the update.

What each message computes is :func:`hlora.engine.flower.node_site.serve`. Flower starts a new ClientApp
process for every message: with ``worker = false`` this process imports torch and transformers and
loads the model and the node's data itself; with ``worker = true`` (the default on Unix) it imports neither
and forwards the message to the node's long-lived worker (:mod:`hlora.engine.flower.node_worker`), which
keeps them loaded for the whole run. Both give the same replies.

Precision: the run-config's ``precision`` (``fp32``, ``bf16``) sets the node's autocast; ``auto`` is
the node's own choice, made once per run by :func:`hlora.precision.resolve_precision` timing a few
training batches on its data, and kept in the node's run state (``context.state``).

Client state (``strategy = "fedsa"``: each client keeps its own B and head between its rounds): the node's
run state holds the entry (an ArrayRecord under :data:`KEPT_KEY`, beside :data:`STATE_KEY`), the one
place it lives. This process adds it to the content it hands to the site or the worker and takes the new
entry out of the reply before the reply leaves the node (the server gets A, B as it was sent, and a
personal head as it was sent), so a node worker keeps nothing: one that is killed and restarted gets the
entry with the next message. Flower keeps ``context.state`` for one run: a resumed run's nodes start from
nothing (the server refuses to resume a fedsa run).

A bad node-config or unreadable data gives an error reply whose reason is one line.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from hlora.engine.flower.node_worker import WorkerError, WorkerPaths, call_worker, to_plain, worker_options

#: Flower's error code for an exception raised by a ClientApp
CLIENT_APP_RAISED_EXCEPTION = 2
#: the key of the node's run state (``context.state``) that keeps what it resolved once per run
STATE_KEY = "hlora-node"
#: the key of a personalised client's kept entry, in the run state and in the content handed to the site
#: (the same as :data:`hlora.engine.flower.records.KEPT_KEY`, which imports torch)
KEPT_KEY = "hlora-client"

log = logging.getLogger("flwr.hlora")

app = ClientApp()


def run_config_of(msg: Message, context: Context) -> dict[str, Any]:
    """The run's run-config: the one the server sends in the message (``run-config``: a resumed run's is
    the stopped run's), else the one Flower gives the node."""
    sent = msg.content.config_records.get("run-config")
    return dict(sent) if sent is not None else dict(context.run_config)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this site's rank, LoRA alpha, number of examples, label names, partition id,
    label counts and precision."""
    return handle("query", msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received factors on this site's data; reply with the update."""
    return handle("train", msg, context)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Score the received global model (its adapter and head) on the share this site holds out (run-config
    ``evaluate-on`` clients or both); reply with the accuracy, eval loss (and F1), or an LM's eval loss and
    perplexity, and the number of examples."""
    return handle("evaluate", msg, context)


def kept_precision(context: Context) -> str | None:
    kept = context.state.get(STATE_KEY)
    return str(kept["precision"]) if isinstance(kept, ConfigRecord) and "precision" in kept else None


def with_kept(content: RecordDict, context: Context) -> RecordDict:
    """The message's content for the site: a copy holding the node's kept entry from its run state under
    :data:`KEPT_KEY` (what a sender put under that key is dropped), or none when it keeps nothing."""
    given = RecordDict({k: v for k, v in content.items() if k != KEPT_KEY})
    kept = context.state.get(KEPT_KEY)
    if isinstance(kept, ArrayRecord):
        given[KEPT_KEY] = kept
    return given


def take_kept(content: RecordDict | None, context: Context) -> None:
    """Move the new kept entry from the site's answer into the node's run state (it never leaves the node)."""
    if content is None or KEPT_KEY not in content:
        return
    kept = content.pop(KEPT_KEY)
    if isinstance(kept, ArrayRecord):
        context.state[KEPT_KEY] = kept


def handle(kind: str, msg: Message, context: Context) -> Message:
    """Answer a message here or through the node worker; an error reply's reason is one line."""
    run_config, node_config = run_config_of(msg, context), dict(context.node_config)
    given = with_kept(msg.content, context)
    try:
        options = worker_options(node_config)
        if options.enabled:
            paths = WorkerPaths.of(options, context.node_id, context.run_id, run_config, node_config)
            answer = call_worker(options, paths, {
                "kind": kind, "content": to_plain(given), "run_config": run_config,
                "node_config": node_config, "kept_precision": kept_precision(context)})
            log.info("hlora ClientApp: %s served by node worker pid %d (%s, message %d)", kind, answer.pid,
                     "started" if answer.started else "running", answer.served)
            content, reason, keep = answer.content, answer.reason, answer.keep_precision
        else:
            from hlora.engine.flower import node_site  # torch and transformers: only without a worker

            served = node_site.serve(kind, given, run_config, node_config, kept_precision(context))
            content, reason, keep = served.content, served.reason, served.keep_precision
    except WorkerError as e:
        content, reason, keep = None, str(e), None
    except Exception as e:  # noqa: BLE001 - a bug or a broken environment: traceback in the node log
        log.error("hlora ClientApp failed:\n%s", traceback.format_exc())
        content, reason, keep = None, f"{type(e).__name__}: {e}", None
    if keep and kept_precision(context) is None:
        context.state[STATE_KEY] = ConfigRecord({"precision": keep})
    take_kept(content, context)
    if content is not None:
        return Message(content, reply_to=msg)
    reason = " ".join(str(reason).split())
    log.error("hlora ClientApp: %s", reason)
    return Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
