"""A Flower run's settings: the shared run-config (as a :class:`~hlora.config.RunConfig`) and each node's
node-config (its data and LoRA rank), and the task every node and the server agree on.

Flower's run-config holds only bool, int, float and str values, with dashes in keys (``per-round``).
Every key that names a :class:`~hlora.config.RunConfig` field means what it means in ``hlora run``; an
empty string means "not set" (so does 0 for ``threads``, ``local-steps`` and ``head-lr``); a list is a comma-separated
string (``text-columns``, ``target-modules``, ``server-betas = "0.9,0.99"``). A few keys are the Flower
engine's own (:class:`FlowerOptions`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from hlora.config import FIELDS, ConfigError, RunConfig, load_config
from hlora.data import (
    INSTRUCT,
    DataError,
    Examples,
    Fields,
    InstructExamples,
    TaskData,
    load_task,
    read_split,
    subset_train,
)
from hlora.data.instruct import read_instruct
from hlora.engine.flower.node_worker import WORKER_KEYS, WorkerError, worker_options


class NodeConfigError(ConfigError):
    """A SuperNode's ``--node-config`` is missing a key or names data it cannot read."""


#: run-config keys of the Flower engine itself, with their defaults
FLOWER_DEFAULTS: dict[str, Any] = {
    "round-timeout": 600.0,
    "node-timeout": 300.0,
    "save-updates": False,
    "labels": "",
    "resume": "",
    "evaluate-on": "server",
    "client-eval-fraction": 0.2,
}
#: who scores the global model: the server on its dev set, the nodes on a held-out share of their data, or both
EVALUATE_ON = ("server", "clients", "both")
#: engine keys a resumed run may change (the others are the saved run's: see :func:`resumed_run_config`)
RESUME_MAY_CHANGE = ("round-timeout", "node-timeout")
#: RunConfig fields that do not come from the run-config (the nodes report their ranks: one rank per node, for
#: every adapted layer; rank policies and per-layer ranks are hlora run's)
NOT_IN_RUN_CONFIG = {"ranks", "client_ranks", "rank_policy", "rank_file", "layer_ranks", "client_layer_ranks"}


@dataclass
class FlowerOptions:
    """The Flower engine's own settings."""

    #: seconds to wait for a round's replies; the round then goes on with those that arrived
    round_timeout: float = 600.0
    #: seconds to wait at the start for ``clients`` nodes to connect
    node_timeout: float = 300.0
    #: write each round's previous state, accepted updates and new state to ``OUT/updates/round-N.pt``
    save_updates: bool = False
    #: the label names, in index order, for nodes that read their own files (``labels = "0,1"``)
    labels: list[str] | None = None
    #: the run directory (``out``) of a stopped run to continue from its last checkpoint; None: a new run
    resume: str | None = None
    #: who scores the global model (:data:`EVALUATE_ON`)
    evaluate_on: str = "server"
    #: the share of a node's examples it holds out to score the global model when clients evaluate
    client_eval_fraction: float = 0.2

    @property
    def clients_evaluate(self) -> bool:
        return self.evaluate_on in ("clients", "both")


def run_settings(run_config: Mapping[str, Any]) -> tuple[RunConfig, FlowerOptions]:
    """Parse a Flower run-config into hlora's RunConfig (validated) and the engine's own options."""
    overrides: dict[str, Any] = {}
    own = dict(FLOWER_DEFAULTS)
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if key in FLOWER_DEFAULTS:
            own[key] = value
        elif name in FIELDS and name not in NOT_IN_RUN_CONFIG:
            if isinstance(value, str) and not value.strip():
                continue  # "" means: not set, the RunConfig default
            if name == "strategy_options":
                value = [p for p in re.split(r"[\s,]+", str(value)) if p]
            if name in ("threads", "local_steps", "head_lr", "train_subset") and value == 0:
                continue  # 0: not set (torch's threads; local-epochs instead of steps; every example)
            if name in ("attack", "attackers", "attack_lambda") and value not in ("none", 0, 0.0):
                raise ConfigError(f"run-config {key}: attacks are simulated by hlora run only (not on Flower)")
            if name == "personal_eval" and value not in (False, "false", 0):
                raise ConfigError('run-config personal-eval: on Flower the nodes score the global model on a '
                                  'held-out share with evaluate-on = "clients"')
            if name == "preset":
                raise ConfigError("run-config preset: the app lists every key with its value, so a preset "
                                  "would change nothing; set the keys themselves")
            overrides[name] = value
        elif name in NOT_IN_RUN_CONFIG:
            raise ConfigError(f"run-config key {key!r}: each node gives its rank (one, for every adapted layer) in "
                              f"its --node-config")
        else:
            raise ConfigError(f"unknown run-config key {key!r}")
    try:
        cfg = load_config(None, overrides)
    except ConfigError as e:
        raise ConfigError(in_run_config_words(str(e))) from None
    try:
        options = FlowerOptions(
            round_timeout=float(own["round-timeout"]),
            node_timeout=float(own["node-timeout"]),
            save_updates=_flag(own["save-updates"]),
            labels=[s.strip() for s in str(own["labels"]).split(",") if s.strip()] or None,
            resume=str(own["resume"]).strip() or None,
            evaluate_on=str(own["evaluate-on"]).strip(),
            client_eval_fraction=float(own["client-eval-fraction"]),
        )
    except ValueError as e:
        raise ConfigError(f"run-config: {e}") from None
    if options.evaluate_on not in EVALUATE_ON:
        raise ConfigError(f"run-config evaluate-on must be one of {', '.join(EVALUATE_ON)}, "
                          f"got {options.evaluate_on!r}")
    if not 0 < options.client_eval_fraction < 1:
        raise ConfigError(f"run-config client-eval-fraction must be in (0, 1), got {options.client_eval_fraction}")
    if options.round_timeout <= 0 or options.node_timeout <= 0:
        raise ConfigError("run-config round-timeout and node-timeout must be > 0 seconds")
    return cfg, options


def in_run_config_words(message: str) -> str:
    """A RunConfig or data error as a Flower user reads it: each ``--flag`` of ``hlora run`` that has a run-config
    key becomes that key (``--per-round`` -> ``per-round``), behind a ``run-config:`` prefix."""
    message = RUN_CONFIG_FLAG.sub(_key_of, message)
    return message if message.startswith("run-config") else f"run-config: {message}"


#: an ``hlora run`` flag in a message (not inside a word or a path: ``a--b`` stays)
RUN_CONFIG_FLAG = re.compile(r"(?<![\w/.-])--([a-z][a-z0-9-]*)")
#: flags whose run-config key is not the flag's own name
FLAG_KEYS = {"strategy-option": "strategy-options"}


def _key_of(flag: re.Match) -> str:
    key = FLAG_KEYS.get(flag[1], flag[1])
    name = key.replace("-", "_")
    return key if name in FIELDS and name not in NOT_IN_RUN_CONFIG else flag[0]


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def shared_task(cfg: RunConfig, labels: list[str] | None, with_dev: bool) -> TaskData:
    """The task as every site sees it: label names (in index order), text columns and the F1 class.

    * ``train`` and ``dev`` in the run-config: files every site can read, as in ``hlora run``;
    * ``labels`` (with ``text-columns`` and ``label-column``): nodes bring their own files;
    * otherwise a named task (``mrpc``, ``rte``, ``hf:NAME``).

    ``task = "instruct"`` (a decoder LM): instruction JSONL, fields per ``prompt-field``, ... as in
    ``hlora run``; ``train`` when nodes take a share of it (partition-id), ``dev`` for the server.

    ``with_dev`` reads the dev set (the server, which evaluates); a node never needs it.

    ``train-subset``: every site keeps the same seeded draw of that training set (:func:`subset_train`).
    """
    if cfg.train_subset is not None and not cfg.train and (labels or cfg.task == INSTRUCT):
        raise ConfigError("run-config train-subset draws from a training set every site reads (train, or a "
                          "named task); here the nodes bring their own files")
    task = _read_task(cfg, labels, with_dev)
    try:
        return subset_train(task, cfg.train_subset)
    except DataError as e:
        raise ConfigError(in_run_config_words(str(e))) from None


def _read_task(cfg: RunConfig, labels: list[str] | None, with_dev: bool) -> TaskData:
    """:func:`shared_task` before its ``train-subset``."""
    if cfg.task == INSTRUCT:
        return instruct_task(cfg, labels, with_dev)
    if labels:
        if not cfg.text_columns or not cfg.label_column:
            raise ConfigError("run-config labels needs text-columns and label-column")
        empty = Examples([], [] if len(cfg.text_columns) == 2 else None, [])
        f1 = labels.index("1") if sorted(labels) == ["0", "1"] else None
        task = TaskData(cfg.task, empty, empty, list(labels), f1, list(cfg.text_columns), cfg.label_column)
        if with_dev and cfg.dev:
            task.dev = read_split(cfg.dev, task)
        return task
    if cfg.train:
        task = load_task(cfg.task, cfg.train, cfg.dev, cfg.text_columns, cfg.label_column)
        return classification_only(task)
    task = classification_only(load_task(cfg.task))
    if with_dev and cfg.dev:
        task.dev = read_split(cfg.dev, task)
    return task


def instruct_task(cfg: RunConfig, labels: list[str] | None, with_dev: bool) -> TaskData:
    """``--task instruct`` as every site sees it: the training set's examples and categories when the
    run-config names ``train`` (nodes with a partition-id split it by category, as ``hlora run``), and the
    dev set for the server; a node with its own ``data-file`` needs neither."""
    if labels:
        raise ConfigError("run-config labels names a classifier's labels; task instruct has none "
                          "(a node brings its own instruction JSONL as data-file)")
    fields = Fields.of(cfg)
    empty = InstructExamples([], [], [])
    try:
        train, categories = read_instruct(cfg.train, fields) if cfg.train else (empty, [])
        dev = read_instruct(cfg.dev, fields)[0] if with_dev and cfg.dev else empty
    except (DataError, OSError, UnicodeDecodeError) as e:
        raise ConfigError(in_run_config_words(str(e))) from None
    return TaskData(INSTRUCT, train, dev, categories, kind=INSTRUCT, train_file=cfg.train or None)


def classification_only(task: TaskData) -> TaskData:
    """A named or file task is a classifier (``task = "instruct"`` goes through :func:`instruct_task`);
    refuse any other kind with one line."""
    kind = getattr(task, "kind", "classify")
    if kind != "classify":
        raise ConfigError(f"the Flower engine runs classification and instruct tasks; a task of kind {kind!r}: "
                          "hlora run")
    return task


@dataclass
class NodeSettings:
    """One SuperNode's ``--node-config``."""

    rank: int
    lora_alpha: float
    data_file: str | None = None
    partition_id: int | None = None
    num_partitions: int | None = None
    model: str | None = None
    threads: int | None = None


NODE_KEYS = ("rank", "lora-alpha", "data-file", "partition-id", "num-partitions", "model", "threads", *WORKER_KEYS)


def node_settings(node_config: Mapping[str, Any], cfg: RunConfig) -> NodeSettings:
    """Read and check a node's ``--node-config``; a problem is a :class:`NodeConfigError` of one line."""
    unknown = sorted(set(node_config) - set(NODE_KEYS))
    if unknown:
        raise NodeConfigError(f"node-config: unknown key {unknown[0]!r} (known: {', '.join(NODE_KEYS)})")
    if "rank" not in node_config:
        raise NodeConfigError("node-config: 'rank' is missing (this site's LoRA rank, e.g. rank=8)")
    rank = _int(node_config, "rank")
    if rank < 1:
        raise NodeConfigError(f"node-config: rank must be at least 1, got {rank}")
    alpha = float(node_config.get("lora-alpha", cfg.lora_alpha))
    if alpha <= 0:
        raise NodeConfigError(f"node-config: lora-alpha must be > 0, got {alpha}")
    data_file = str(node_config.get("data-file", "")) or None
    pid = _int(node_config, "partition-id") if "partition-id" in node_config else None
    parts = _int(node_config, "num-partitions") if "num-partitions" in node_config else None
    if data_file is None and (pid is None or parts is None):
        raise NodeConfigError("node-config: give data-file, or partition-id and num-partitions")
    if data_file is not None and (pid is not None or parts is not None):
        raise NodeConfigError("node-config: give data-file or partition-id/num-partitions, not both")
    if parts is not None and not 0 <= (pid or 0) < parts:
        raise NodeConfigError(f"node-config: partition-id must be in 0..{parts - 1}, got {pid}")
    threads = _int(node_config, "threads") if "threads" in node_config else None
    try:
        worker_options(node_config)  # worker, worker-idle, worker-dir: read by the ClientApp itself
    except WorkerError as e:
        raise NodeConfigError(str(e)) from None
    model = str(node_config.get("model", "")) or None
    return NodeSettings(rank, alpha, data_file, pid, parts, model, threads or None)


def _int(node_config: Mapping[str, Any], key: str) -> int:
    value = node_config[key]
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise NodeConfigError(f"node-config: {key} must be an integer, got {value!r}") from None


def node_examples(node: NodeSettings, cfg: RunConfig, task: TaskData) -> Examples:
    """This site's training examples: its own file, or its share of the task's training set (the same
    seeded split as ``hlora run --clients num-partitions --partition ... --seed ...``)."""
    if node.data_file is not None:
        path = Path(node.data_file).expanduser()
        if not path.is_file():
            raise NodeConfigError(f"node-config: data-file {node.data_file!r} does not exist (or is no file)")
        try:
            if task.kind == INSTRUCT:  # its own categories: they only matter to a split, and it is not split
                examples = read_instruct(path, Fields.of(cfg))[0]
            else:
                examples = read_split(path, task)
        except (DataError, OSError, UnicodeDecodeError) as e:
            raise NodeConfigError(f"node-config: data-file {node.data_file!r} cannot be read: {e}") from None
        if not len(examples):
            raise NodeConfigError(f"node-config: data-file {node.data_file!r} holds no examples")
        return examples
    if not len(task.train):
        raise NodeConfigError(
            "node-config: partition-id needs a training set in the run-config (a task such as mrpc, or train)"
        )
    assert node.partition_id is not None and node.num_partitions is not None
    if node.num_partitions > len(task.train):
        raise NodeConfigError(f"node-config: num-partitions {node.num_partitions} exceeds the "
                              f"{len(task.train)} training examples")
    try:
        parts = cfg.client_parts(task, node.num_partitions)
    except ConfigError as e:
        raise NodeConfigError(f"node-config: {e}") from None
    return task.train.subset(parts[node.partition_id])


#: the file in a Flower run's directory that maps clients to nodes and keeps the run-config (for resume)
FLOWER_JSON = "flower.json"


def resumed_run_config(run_config: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The run-config of the stopped run that ``resume = "OUT"`` continues: the one it started with (kept
    in ``OUT/flower.json``), with this run-config's ``round-timeout`` and ``node-timeout``, and ``out`` set
    to OUT. Returns it and the keys of this run-config that it overrides (ignored, as ``hlora run --resume``
    takes no other options). A directory that holds no stopped Flower run is refused with one line."""
    out = Path(str(run_config["resume"])).expanduser().resolve()
    if not (out / "config.yaml").is_file():
        raise ConfigError(f"run-config resume {out}: no run there (config.yaml is missing)")
    if (out / "summary.json").exists():
        raise ConfigError(f"run-config resume {out}: this run has already finished")
    try:
        saved = json.loads((out / FLOWER_JSON).read_text())["run_config"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"run-config resume {out}: {FLOWER_JSON} holds no run-config (not a Flower run, "
                          f"or one written before resume existed)") from None
    given = {k: v for k, v in run_config.items() if k not in (*RESUME_MAY_CHANGE, "resume", "out")}
    ignored = sorted(k for k, v in given.items() if saved.get(k, v) != v)
    merged = {**saved, **{k: run_config[k] for k in RESUME_MAY_CHANGE if k in run_config}, "out": str(out),
              "resume": ""}
    return merged, ignored


#: a node's examples: a classifier's, or an LM's instruction examples
NodeExamples = TypeVar("NodeExamples", Examples, InstructExamples)


def held_out(examples: NodeExamples, fraction: float, seed: int,
             partition_id: int) -> tuple[NodeExamples, NodeExamples]:
    """A node's examples split for client evaluation: (what it trains on, what it scores the global model on);
    a classifier's labelled examples or, for ``task = "instruct"``, its instruction examples, by the same rule.

    A seeded ``fraction`` of them (at least one, and at least one left to train on) is held out; the draw
    depends on the run's seed, the node's partition id (-1: its own file) and its number of examples."""
    n = len(examples)
    if n < 2:
        raise NodeConfigError(f"node-config: {n} example(s): too few to hold some out (run-config evaluate-on)")
    k = min(n - 1, max(1, round(fraction * n)))
    order = np.random.default_rng([seed, 5, partition_id + 1, n]).permutation(n)
    return examples.subset(sorted(order[k:].tolist())), examples.subset(sorted(order[:k].tolist()))
