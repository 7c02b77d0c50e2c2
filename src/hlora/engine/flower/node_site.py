"""What a node computes for each message kind, on the site it loads once (the heavy half of the ClientApp).

:func:`serve` answers one message (``query``, ``train``, ``evaluate``) given its content and the run's
run-config and the node's node-config: it loads the node's :class:`Site` (base model with LoRA slots,
tokenized data, rank) on first use and keeps it in this process (:data:`_SITES`). The ClientApp calls it
in its own process (node-config ``worker = false``: Flower starts a new process per message, so each
message loads the site again), or a node worker (:mod:`hlora.engine.flower.node_worker`) calls it for
every message of a run, with the site loaded once.

Every request starts from the same state as a fresh process would: ``train_client`` installs the
payload's adapter and head, seeds the shuffling and torch's RNG (dropout) from the message's seed, sets
train mode and clears the slots after; ``evaluate`` installs the global adapter and head and sets eval
mode; the torch threads, dropout, attention and precision are the site's, set once at its load.

A personalised strategy (``fedsa``: each client keeps its own B and head) keeps nothing here: the ClientApp
hands the node's kept entry (from its run state, ``context.state``) to :func:`serve` in the message's content
under :data:`~hlora.engine.flower.records.KEPT_KEY`, and takes the new one back from the reply's content. A
site holds out a seeded ``personal-holdout`` share of its examples (:func:`personal_split`, the simulation's
draw for a partition-id node) and trains on the rest; ``train`` runs the simulation's client side
(:func:`hlora.client_state.personal_round`) and ``evaluate`` scores the node's own model on that share.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ConfigRecord, RecordDict

from hlora.client import train_client
from hlora.client_state import ClientStates, holdout_positions, personal_round
from hlora.config import ConfigError, RunConfig
from hlora.data import DataError, Encoded, EncodedLM, TaskData
from hlora.engine.flower.personal import check_personal
from hlora.engine.flower.records import (
    KEPT_KEY,
    RecordError,
    TrainSettings,
    kept_to_record,
    record_to_kept,
    record_to_payload,
    update_to_record,
)
from hlora.engine.flower.settings import held_out, node_examples, node_settings, run_settings, shared_task
from hlora.factors import init_factors
from hlora.metrics import count_correct, evaluate, evaluate_lm
from hlora.model import FederatedModel, ModelError
from hlora.objectives import Objective, label_counts, offset_from_counts
from hlora.precision import resolve_precision
from hlora.strategies import Payload, Strategy, StrategyError, get_strategy
from hlora.tasks import INSTRUCT, load_model, tokenize

log = logging.getLogger("flwr.hlora")

#: a user mistake or bad input: the error reply's reason is the message alone (no traceback in the log)
EXPECTED_ERRORS = (ConfigError, DataError, ModelError, RecordError, StrategyError)


@dataclass
class Site:
    """What a node loads once: the base model with LoRA slots, its tokenized data, its rank."""

    fm: FederatedModel
    #: its training examples, tokenized (``EncodedLM`` for --task instruct: loss on the responses only)
    data: Encoded | EncodedLM
    task: TaskData
    rank: int
    lora_alpha: float
    #: the node's share of a split of the run's task (``partition-id``), or -1 for its own data file
    partition_id: int = -1
    #: how many of its training examples have each label, in label order (none for --task instruct)
    label_counts: list[int] = field(default_factory=list)
    #: the share it holds out to score the global model (run-config evaluate-on clients or both), or None
    #: (``EncodedLM`` for --task instruct)
    heldout: Encoded | EncodedLM | None = None
    #: the run-config's precision is ``auto``: ``fm.precision`` is the node's choice, kept for the run
    auto_precision: bool = False
    #: the run's strategy (a personalised one, ``strategy.personal``, trains and scores the node's own model)
    strategy: Strategy | None = None
    #: a personalised strategy's held-out share (``personal-holdout``), on which the node scores its own model
    personal_heldout: Encoded | None = None


#: sites loaded by this process, by (run-config, node-config): a process that serves several
#: messages (a node worker, or several nodes in simulation) loads the model and data once
_SITES: dict[tuple[str, str], Site] = {}


def load_site(run_config: Mapping[str, Any], node_config: Mapping[str, Any], kept_precision: str | None = None) -> Site:
    """The node's model and data, loaded on first use (a ConfigError subclass with a one-line reason).

    ``kept_precision``: the node's choice for ``precision = "auto"`` made on an earlier message of the run
    (kept in the node's run state), or None: choose now (:func:`node_precision`)."""
    run_config, node_config = dict(run_config), dict(node_config)
    key = (json.dumps(run_config, sort_keys=True), json.dumps(node_config, sort_keys=True))
    if key in _SITES:
        return _SITES[key]
    cfg, options = run_settings(run_config)
    node = node_settings(node_config, cfg)
    if node.threads or cfg.threads:
        torch.set_num_threads(node.threads or cfg.threads)
    task = shared_task(cfg, options.labels, with_dev=False)
    examples = node_examples(node, cfg, task)
    part = -1 if node.partition_id is None else node.partition_id
    strategy = get_strategy(cfg.strategy, **cfg.strategy_options)
    heldout = personal = None
    check_personal(strategy, cfg, options, resumed=False)  # the server's refusals, should a node see such a run
    if strategy.personal:  # the node scores its own model on a held-out share, as hlora run's client does
        examples, personal = personal_split(examples, cfg.personal_holdout, cfg.seed, node.partition_id)
    elif options.clients_evaluate:  # only then: a run where the server evaluates trains on all of it
        examples, heldout = held_out(examples, options.client_eval_fraction, cfg.seed, part)
    cfg.model = node.model or cfg.model
    # a classifier, or for --task instruct a causal LM in dtype (gradient-checkpointing), as hlora run loads
    # it; dropout and attention set (attention auto: the node's own device decides)
    model, tokenizer = load_model(cfg, task)
    fm = FederatedModel(model, cfg.target_modules)
    width = min(min(shape) for shape in fm.shapes.values())
    if node.rank > width:
        raise ConfigError(f"node-config: rank {node.rank} is above the width {width} of the adapted layers")
    lm = task.kind == INSTRUCT
    counts = [] if lm else label_counts(examples.labels, task.num_labels).tolist()
    site = Site(fm, tokenize(task, tokenizer, examples, cfg.max_length), task, node.rank, node.lora_alpha, part,
                counts, None if heldout is None else tokenize(task, tokenizer, heldout, cfg.max_length),
                auto_precision=cfg.precision == "auto", strategy=strategy,
                personal_heldout=None if personal is None or task.kind == INSTRUCT  # an LM: no personal scores
                else tokenize(task, tokenizer, personal, cfg.max_length))
    fm.precision = node_precision(site, cfg, kept_precision)
    _SITES[key] = site
    return site


def personal_split(examples: Any, fraction: float, seed: int, partition_id: int | None) -> tuple[Any, Any]:
    """A personalised strategy's node examples: (what it trains on, what it scores its own model on). A node
    holding ``partition_id`` k draws what ``hlora run``'s client k draws (:func:`hlora.client_state.split_holdout`,
    key ``[seed, 5, k]``), so a Flower run of partition-id nodes equals the simulation; a node with its own data
    file draws with key ``[seed, 6, n]``. Fewer than two examples: none held out."""
    n = len(examples)
    key = [seed, 5, partition_id] if partition_id is not None else [seed, 6, n]
    keep, out = holdout_positions(n, fraction, key)
    return examples.subset(keep), examples.subset(out)


def node_precision(site: Site, cfg: RunConfig, kept: str | None = None) -> str:
    """The run-config's precision; for ``auto``, the node's own choice (a few timed training batches),
    made on the run's first message and then ``kept`` (in the node's run state, ``context.state``: Flower
    starts a new ClientApp process for every message)."""
    if cfg.precision != "auto":
        return cfg.precision
    if kept:
        return kept
    return resolve_precision("auto", lambda mode: _probe_step(site, cfg, mode))


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
    if settings.logit_adjust and site.task.kind != INSTRUCT:  # an LM has no labels to adjust (hlora run too)
        counts = settings.label_counts
        if not counts or len(counts) != site.task.num_labels:
            raise RecordError(f"logit-adjust needs the federation's {site.task.num_labels} label counts; "
                              f"the train message holds {counts!r}")
        offset = offset_from_counts(site.label_counts, counts, settings.logit_adjust)
    return Objective(offset=offset, prox_mu=settings.prox_mu)


def answer_query(site: Site, content: RecordDict) -> RecordDict:
    """This site's rank, LoRA alpha, number of examples, label names, partition id, label counts and
    precision. A decoder LM (--task instruct) has no labels: ``labels`` is empty and there are no
    ``label-counts``."""
    del content
    lm = site.task.kind == INSTRUCT
    return RecordDict({"site": ConfigRecord({
        "rank": site.rank,
        "lora-alpha": float(site.lora_alpha),
        "num-examples": len(site.data),
        "labels": [] if lm else list(site.task.label_names),
        "partition-id": site.partition_id,
        **({} if lm else {"label-counts": list(site.label_counts)}),
        "precision": site.fm.precision,
    })})


def answer_train(site: Site, content: RecordDict) -> RecordDict:
    """The received factors trained on this site's data: the update. A personalised strategy's node trains
    from what it kept (the content's :data:`KEPT_KEY`) and replies with the new entry under the same key
    (:func:`hlora.client_state.personal_round`: the update it replies with is what the strategy shares)."""
    payload, settings = record_to_payload(content)

    def train(payload: Payload) -> Any:
        return train_client(
            site.fm, payload, site.data, list(range(len(site.data))), client_id=settings.client,
            epochs=settings.local_epochs, lr=settings.lr, batch_size=settings.batch_size, seed=settings.seed,
            local_steps=settings.local_steps, objective=objective(site, settings),
            head_opt=settings.head_opt, head_lr=settings.head_lr, client_opt=settings.client_opt,
            adam_eps=settings.adam_eps,
        )

    if site.strategy is None or not site.strategy.personal:
        return update_to_record(train(payload))
    states = kept_states(content, settings.client)
    reply = update_to_record(personal_round(site.strategy, states, settings.client, payload, train))
    entry = states.get(settings.client)
    if entry:
        reply[KEPT_KEY] = kept_to_record(entry)
    return reply


def kept_states(content: RecordDict, client: int) -> ClientStates:
    """The store of one client: what the node kept (the content's :data:`KEPT_KEY`), or nothing."""
    kept = content.array_records.get(KEPT_KEY)
    return ClientStates({client: record_to_kept(kept)} if kept is not None and len(kept) else {})


def answer_evaluate(site: Site, content: RecordDict) -> RecordDict:
    """The received global model's (adapter and head) scores on the share this site holds out
    (:func:`heldout_scores`) and the number of its examples; for a personalised strategy,
    :func:`answer_personal`."""
    if site.strategy is not None and site.strategy.personal:
        return answer_personal(site, content)
    if site.heldout is None:
        raise ConfigError("this node holds out no examples (run-config evaluate-on is server)")
    payload, settings = record_to_payload(content)
    scores = heldout_scores(site, payload, settings.batch_size)
    return RecordDict({"eval": ConfigRecord({"client": settings.client, "examples": len(site.heldout), **scores})})


def heldout_scores(site: Site, payload: Payload, batch_size: int) -> dict[str, float]:
    """The model W0 + ``payload`` on the site's held-out share: a classifier's accuracy, eval loss (and F1),
    as :func:`hlora.metrics.evaluate`; an LM's ``eval_loss`` (mean cross-entropy per response token) and
    ``perplexity``, as :func:`hlora.metrics.evaluate_lm` scores the server's dev set, without ROUGE-L (no
    generation on a node: ``gen_samples`` 0)."""
    assert site.heldout is not None
    if isinstance(site.heldout, EncodedLM):
        return evaluate_lm(site.fm, payload.lora, site.heldout, batch_size, None, [], 0, 1)
    return evaluate(site.fm, payload.lora, payload.head, site.heldout, batch_size, site.task.f1_label)


def answer_personal(site: Site, content: RecordDict) -> RecordDict:
    """The node's own model (the received payload personalised with what it kept: ``strategy.personalise``;
    nothing kept: the payload itself, for fedsa B = 0 and the initial head) on its ``personal-holdout``
    share: the examples it gets right and their number (0: it holds none out), as ``hlora run`` counts them
    (:func:`hlora.client_state.personal_scores`)."""
    payload, settings = record_to_payload(content)
    assert site.strategy is not None
    model = site.strategy.personalise(payload, kept_states(content, settings.client).get(settings.client))
    data = site.personal_heldout
    right = 0
    if data is not None and len(data):
        right = count_correct(site.fm, model.lora, model.head, data, settings.batch_size)
    examples = 0 if data is None else len(data)
    return RecordDict({"personal": ConfigRecord({"client": settings.client, "examples": examples, "correct": right})})


ANSWERS = {"query": answer_query, "train": answer_train, "evaluate": answer_evaluate}


@dataclass
class Served:
    """One message's outcome: the reply's content, or the one-line reason of an error reply; and the
    precision to keep in the node's run state (``auto`` resolved), if any."""

    content: RecordDict | None
    reason: str | None = None
    keep_precision: str | None = None


def serve(kind: str, content: RecordDict, run_config: Mapping[str, Any], node_config: Mapping[str, Any],
          kept_precision: str | None = None) -> Served:
    """Answer one message of ``kind`` (query, train, evaluate); a problem is an error reason of one line
    (a user mistake, or a crash whose traceback goes to the log)."""
    keep = None
    try:
        site = load_site(run_config, node_config, kept_precision)
        keep = site.fm.precision if site.auto_precision else None
        return Served(ANSWERS[kind](site, content), keep_precision=keep)
    except EXPECTED_ERRORS as e:
        reason = str(e)
    except Exception as e:  # noqa: BLE001 - a bug or a broken environment: traceback in the node log
        log.error("hlora ClientApp failed:\n%s", traceback.format_exc())
        reason = f"{type(e).__name__}: {e}"
    return Served(None, " ".join(reason.split()), keep)
