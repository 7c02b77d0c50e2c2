"""Payloads and updates as Flower records, and back. Pure: no network, no model, no file.

A train message (server -> node) holds one client's :class:`~hlora.strategies.Payload` and its local
training settings; the reply (node -> server) holds its :class:`~hlora.strategies.Update`. Each message
carries tensors of its own client's rank, so every node gets factors of its own shape.

Layout of a message's :class:`~flwr.app.RecordDict`:

=================  ===========  ===========================================================
key                record       holds
=================  ===========  ===========================================================
``lora``           ArrayRecord  ``<module>/B`` and ``<module>/A`` of the trainable factors
``frozen``         ArrayRecord  the same for the frozen factors (payloads only)
``head``           ArrayRecord  the classification head's parameters
``info-arrays``    ArrayRecord  the tensors found in ``info`` (e.g. Fed-PLoRA's indices)
``config``         ConfigRecord module order and LoRA scalings, ``info`` as JSON, train_A, train_B,
                                tail_penalty, the client id, and training settings or results
``hlora-client``   ArrayRecord  a personalised strategy's (fedsa) kept entry: only between the ClientApp
                                and the node's site or worker, never on the network (:data:`KEPT_KEY`)
=================  ===========  ===========================================================

A train message's settings (:class:`TrainSettings`): ``local-steps`` 0 means "not set" (train
``local-epochs``), ``label-counts`` ``[]`` means "none" (no logit adjustment). A message without the
keys added later (``train-B``, ``local-steps``, ``prox-mu``, ``logit-adjust``, ``label-counts``, ``head-opt``, ``head-lr``, ``client-opt``, ``adam-eps``) reads as their defaults.

Module and head names are listed in order in ``config`` (records are maps, their order is not kept).
Scalings travel as 64-bit floats, so they come back bit for bit. ArrayRecord rejects bfloat16: such
tensors are sent as float32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from torch import Tensor

from hlora.factors import Adapter, Factor
from hlora.strategies import Payload, Update


#: the key of a personalised client's kept entry (:mod:`hlora.client_state`): in the node's run state
#: (``context.state``), and in the content the ClientApp hands to the node's site (or worker) and takes back
KEPT_KEY = "hlora-client"


class RecordError(ValueError):
    """A message does not hold a valid payload or update."""


@dataclass
class TrainSettings:
    """How a node trains for one round (the same values the simulation passes to ``train_client``)."""

    client: int
    round: int
    seed: int
    local_epochs: int
    #: the round's client learning rate (``lr``, or its cosine schedule)
    lr: float
    batch_size: int
    #: fixed optimizer steps (overrides ``local_epochs``); None: epochs
    local_steps: int | None = None
    prox_mu: float = 0.0
    #: logit adjustment tau (0: off)
    logit_adjust: float = 0.0
    #: the federation's training label counts in label order (for logit adjustment), or None
    label_counts: list[int] | None = None
    #: the head's optimizer (adamw, sgd, frozen) and lr (None: lr)
    head_opt: str = "adamw"
    head_lr: float | None = None
    #: the adapters' optimizer (adamw, sgd)
    client_opt: str = "adamw"
    adam_eps: float = 1e-8


def payload_to_record(payload: Payload, settings: TrainSettings) -> RecordDict:
    """One train message's content: the client's payload and how to train on it."""
    arrays: dict[str, Tensor] = {}
    info = _encode_info(payload.info, arrays)
    config = ConfigRecord({
        **_adapter_config("lora", payload.lora),
        **_adapter_config("frozen", payload.frozen),
        "head-names": list(payload.head),
        "info": json.dumps(info),
        "train-A": bool(payload.train_A),
        "train-B": bool(payload.train_B),
        "tail-penalty": float(payload.tail_penalty),
        "client": int(settings.client),
        "round": int(settings.round),
        "seed": int(settings.seed),
        "local-epochs": int(settings.local_epochs),
        "lr": float(settings.lr),
        "batch-size": int(settings.batch_size),
        "local-steps": int(settings.local_steps or 0),
        "prox-mu": float(settings.prox_mu),
        "logit-adjust": float(settings.logit_adjust),
        "label-counts": [int(c) for c in settings.label_counts or []],
        "head-opt": str(settings.head_opt),
        "head-lr": float(settings.head_lr or 0.0),
        "client-opt": str(settings.client_opt),
        "adam-eps": float(settings.adam_eps),
    })
    return RecordDict({
        "lora": _adapter_record(payload.lora),
        "frozen": _adapter_record(payload.frozen),
        "head": _tensor_record(payload.head),
        "info-arrays": _tensor_record(arrays),
        "config": config,
    })


def record_to_payload(content: RecordDict) -> tuple[Payload, TrainSettings]:
    """Inverse of :func:`payload_to_record`."""
    try:
        config = content.config_records["config"]
        arrays = content.array_records
        payload = Payload(
            lora=_read_adapter(arrays["lora"], config, "lora"),
            head=_read_tensors(arrays["head"], config["head-names"]),
            frozen=_read_adapter(arrays["frozen"], config, "frozen"),
            train_A=bool(config["train-A"]),
            train_B=bool(config.get("train-B", True)),
            info=_decode_info(json.loads(str(config["info"])), arrays["info-arrays"]),
            tail_penalty=float(config["tail-penalty"]),
        )
        settings = TrainSettings(
            client=int(config["client"]), round=int(config["round"]), seed=int(config["seed"]),
            local_epochs=int(config["local-epochs"]), lr=float(config["lr"]),
            batch_size=int(config["batch-size"]),
            local_steps=int(config.get("local-steps", 0)) or None,
            prox_mu=float(config.get("prox-mu", 0.0)),
            logit_adjust=float(config.get("logit-adjust", 0.0)),
            label_counts=[int(c) for c in config.get("label-counts", [])] or None,
            head_opt=str(config.get("head-opt", "adamw")),
            head_lr=float(config.get("head-lr", 0.0)) or None,
            client_opt=str(config.get("client-opt", "adamw")),
            adam_eps=float(config.get("adam-eps", 1e-8)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise RecordError(f"not a valid hlora train message: {type(e).__name__}: {e}") from e
    return payload, settings


def update_to_record(update: Update) -> RecordDict:
    """A train reply's content: the client's update."""
    arrays: dict[str, Tensor] = {}
    info = _encode_info(update.info, arrays)
    config = ConfigRecord({
        **_adapter_config("lora", update.lora),
        "head-names": list(update.head),
        "info": json.dumps(info),
        "client": int(update.client),
        "num-examples": int(update.num_examples),
        "train-loss": float(update.train_loss),
    })
    return RecordDict({
        "lora": _adapter_record(update.lora),
        "head": _tensor_record(update.head),
        "info-arrays": _tensor_record(arrays),
        "config": config,
    })


def record_to_update(content: RecordDict) -> Update:
    """Inverse of :func:`update_to_record`."""
    try:
        config = content.config_records["config"]
        arrays = content.array_records
        return Update(
            client=int(config["client"]),
            lora=_read_adapter(arrays["lora"], config, "lora"),
            head=_read_tensors(arrays["head"], config["head-names"]),
            num_examples=int(config["num-examples"]),
            info=_decode_info(json.loads(str(config["info"])), arrays["info-arrays"]),
            train_loss=float(config["train-loss"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise RecordError(f"not a valid hlora update: {type(e).__name__}: {e}") from e


def _wire(t: Tensor) -> Tensor:
    t = t.detach().cpu()
    return t.float() if t.dtype == torch.bfloat16 else t


def _adapter_record(adapter: Adapter) -> ArrayRecord:
    record = ArrayRecord()
    for m, f in adapter.items():
        record[f"{m}/B"] = Array(_wire(f.B).numpy())
        record[f"{m}/A"] = Array(_wire(f.A).numpy())
    return record


def _adapter_config(prefix: str, adapter: Adapter) -> dict[str, Any]:
    scales = [float(f.scale) for f in adapter.values()]
    return {f"{prefix}-modules": list(adapter), f"{prefix}-scales": scales}


def _read_adapter(record: ArrayRecord, config: ConfigRecord, prefix: str) -> Adapter:
    modules = list(config[f"{prefix}-modules"])
    scales = list(config[f"{prefix}-scales"])
    if len(modules) != len(scales):
        raise ValueError(f"{len(modules)} {prefix} modules but {len(scales)} scalings")
    return {m: Factor(_tensor(record[f"{m}/B"]), _tensor(record[f"{m}/A"]), float(s))
            for m, s in zip(modules, scales)}


def _tensor_record(tensors: dict[str, Tensor]) -> ArrayRecord:
    record = ArrayRecord()
    for name, t in tensors.items():
        record[name] = Array(_wire(t).numpy())
    return record


def _read_tensors(record: ArrayRecord, names: list[str]) -> dict[str, Tensor]:
    return {name: _tensor(record[name]) for name in names}


def _tensor(array: Array) -> Tensor:
    return torch.from_numpy(array.numpy().copy())


def _encode_info(value: Any, arrays: dict[str, Tensor]) -> Any:
    """JSON-able form of ``info``: tensors are moved to ``arrays`` and replaced by a reference."""
    if isinstance(value, Tensor):
        key = str(len(arrays))
        arrays[key] = value
        return {"__tensor__": key}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"info keys must be strings, got {list(value)!r}")
        return {k: _encode_info(v, arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode_info(v, arrays) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot send a {type(value).__name__} in a payload's info")


def _decode_info(value: Any, record: ArrayRecord) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return _tensor(record[value["__tensor__"]])
        return {k: _decode_info(v, record) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_info(v, record) for v in value]
    return value


def with_run_config(content: RecordDict, run_config: dict[str, Any]) -> RecordDict:
    """A message's content with the run's run-config (``run-config``), which the nodes use rather than the
    one Flower gives them: a resumed run's is the stopped run's (see
    :func:`hlora.engine.flower.settings.resumed_run_config`)."""
    content["run-config"] = ConfigRecord(dict(run_config))
    return content


def kept_to_record(entry: dict[str, Any]) -> ArrayRecord:
    """A client's kept entry (nested dicts of tensors, e.g. fedsa's ``{"B": {module: B}, "head": {name: W}}``)
    as one ArrayRecord: each tensor under its path of keys joined by ``\x1f`` (module names hold dots and
    slashes). Tensors travel as they are (bfloat16 as float32, as everywhere in these records)."""
    record = ArrayRecord()

    def walk(value: Any, path: tuple[str, ...]) -> None:
        if isinstance(value, Tensor):
            record[_SEP.join(path)] = Array(_wire(value).numpy())
        elif isinstance(value, dict):
            if not value and path:
                record[_SEP.join((*path, _EMPTY))] = Array(np.zeros(0, dtype=np.float32))
            for k, v in value.items():
                walk(v, (*path, str(k)))
        else:
            raise TypeError(f"cannot keep a {type(value).__name__} in a client's entry")

    walk(entry, ())
    return record


def record_to_kept(record: ArrayRecord) -> dict[str, Any]:
    """Inverse of :func:`kept_to_record`."""
    entry: dict[str, Any] = {}
    for key in record:
        *path, last = key.split(_SEP)
        node = entry
        for part in path:
            node = node.setdefault(part, {})
        if last != _EMPTY:
            node[last] = _tensor(record[key])
    return entry


#: joins the keys of a kept tensor's path; marks an empty dict (fedsa's ``head`` with a shared head)
_SEP, _EMPTY = "\x1f", "\x1e"
