"""The Flower engine without a network: records on the wire, settings, and the ClientApp in-process."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import tomli
import torch
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message import make_message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from hlora.client import train_client
from hlora.config import ConfigError, RunConfig
from hlora.data import encode, load_task, partition
from hlora.engine.flower import client_app, node_site
from hlora.engine.flower.records import (
    RecordError,
    TrainSettings,
    payload_to_record,
    record_to_payload,
    record_to_update,
    update_to_record,
)
from hlora.engine.flower.settings import NodeConfigError, node_settings, run_settings, shared_task
from hlora.factors import Factor, init_factors
from hlora.model import FederatedModel, configure, load_classifier
from hlora.objectives import Objective, logit_offset, offset_from_counts
from hlora.privacy import CLIP_KEY, DP
from hlora.server import client_seed
from hlora.strategies import ClientSpec, Payload, Update, get_strategy

APP = Path(__file__).resolve().parents[1] / "flower-app" / "pyproject.toml"
SHAPES = {"layer.0.query": (6, 5), "layer.0.value": (6, 5), "layer.1.query": (6, 5)}


def wire(content: RecordDict) -> RecordDict:
    """What the other side gets: the records deflated to bytes, as Flower sends them, and inflated."""
    objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}
    return inflate_object_from_contents(content.object_id, objects)


def same_adapter(a, b) -> None:
    assert list(a) == list(b)
    for m in a:
        assert torch.equal(a[m].B, b[m].B) and torch.equal(a[m].A, b[m].A) and a[m].scale == b[m].scale
        assert a[m].B.dtype == b[m].B.dtype


def same_info(a, b) -> None:
    assert type(a) is type(b) or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            same_info(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b) and a.dtype == b.dtype
    else:
        assert a == b


def state_after_one_round(name: str, **options):
    """A strategy's state after one aggregation, so payloads hold trained values (and FLoRA's frozen part)."""
    strategy = get_strategy(name, **options)
    init = init_factors(SHAPES, 4, torch.Generator().manual_seed(0))
    head = {"classifier.weight": torch.randn(2, 6), "classifier.bias": torch.zeros(2)}
    state = strategy.init_state(init, head)
    clients = [ClientSpec(i, dict.fromkeys(SHAPES, r), 8.0, 10 + i) for i, r in enumerate((2, 4, 3))]
    updates = []
    for spec in clients:
        p = strategy.dispatch(state, spec, torch.Generator().manual_seed(spec.id))
        lora = {m: Factor(f.B + 0.1 * torch.randn_like(f.B), f.A, f.scale) for m, f in p.lora.items()}
        updates.append(Update(spec.id, lora, p.head, spec.num_examples, dict(p.info), 0.5))
    return strategy, strategy.aggregate(state, updates), clients


@pytest.mark.parametrize("name,options", [
    ("hlora", {}), ("flexlora", {}), ("hetlora", {"prune": True}), ("ffa", {}), ("flora", {}),
    ("fedplora", {}),
])
def test_payloads_and_updates_cross_the_wire_bit_for_bit(name, options):
    strategy, state, clients = state_after_one_round(name, **options)
    for spec in clients:
        payload = strategy.dispatch(state, spec, torch.Generator().manual_seed(client_seed(0, 2, spec.id, 1)))
        settings = TrainSettings(spec.id, 2, client_seed(0, 2, spec.id), 2, 3e-4, 16)
        got, got_settings = record_to_payload(wire(payload_to_record(payload, settings)))
        assert got_settings == settings
        same_adapter(got.lora, payload.lora)
        same_adapter(got.frozen, payload.frozen)
        assert list(got.head) == list(payload.head)
        assert all(torch.equal(got.head[k], payload.head[k]) for k in payload.head)
        assert got.train_A == payload.train_A and got.tail_penalty == payload.tail_penalty
        same_info(got.info, payload.info)
        # every client gets factors of its own rank
        assert all(f.rank == min(spec.ranks[m], 4) for m, f in got.lora.items()) or name == "fedplora"

        update = Update(spec.id, payload.lora, payload.head, 7, dict(payload.info), 0.25)
        back = record_to_update(wire(update_to_record(update)))
        same_adapter(back.lora, update.lora)
        same_info(back.info, update.info)
        assert (back.client, back.num_examples, back.train_loss) == (spec.id, 7, 0.25)


def test_bfloat16_travels_as_float32_and_bad_records_are_refused():
    f = Factor(torch.ones(3, 2, dtype=torch.bfloat16), torch.ones(2, 4, dtype=torch.bfloat16), 2.0)
    update = Update(0, {"m": f}, {}, 1)
    back = record_to_update(wire(update_to_record(update)))
    assert back.lora["m"].B.dtype == torch.float32 and torch.equal(back.lora["m"].A, torch.ones(2, 4))
    with pytest.raises(RecordError, match="not a valid hlora update"):
        record_to_update(RecordDict({"config": ConfigRecord({"client": 1})}))


def test_the_flower_app_config_is_a_valid_hlora_run_config():
    config = tomli.loads(APP.read_text())
    app = config["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "hlora.engine.flower.server_app:app",
                                 "clientapp": "hlora.engine.flower.client_app:app"}
    cfg, options = run_settings(app["config"])
    assert (cfg.task, cfg.model, cfg.strategy) == ("mrpc", "minilm", "hlora")
    assert (cfg.clients, cfg.per_round, cfg.partition) == (3, 3, "iid")
    assert cfg.threads is None and cfg.train is None and options.labels is None and not options.save_updates
    cfg, options = run_settings({**app["config"], "strategy": "hetlora", "labels": "no,yes",
                                 "strategy-options": "norm_weights=true prune=1", "save-updates": True,
                                 "target-modules": "query,key"})
    assert cfg.strategy_options == {"norm_weights": True, "prune": 1}
    assert options.labels == ["no", "yes"] and options.save_updates and cfg.target_modules == ["query", "key"]


def test_the_flower_app_defaults_are_hlora_run_defaults():
    from dataclasses import asdict

    from hlora.config import RunConfig

    config = tomli.loads(APP.read_text())["tool"]["flwr"]["app"]["config"]
    defaults = asdict(RunConfig())
    own_choice = {"clients", "per_round", "rounds", "partition", "out"}  # a 3-site demo, not hlora run's 100
    for key, value in config.items():
        name = key.replace("-", "_")
        if name in defaults and name not in own_choice:
            expected = "" if defaults[name] in (None, {}, []) else defaults[name]
            if isinstance(expected, list):  # run-config values are scalars: a list is "a,b"
                expected = ",".join(map(str, expected))
            assert value == expected or (name == "threads" and value == 0), key
    assert run_settings(config)[0] == RunConfig(clients=3, per_round=3, rounds=5, partition="iid",
                                                out="runs/flower").validate()


def test_run_config_mistakes_are_named():
    with pytest.raises(ConfigError, match="unknown run-config key 'roundz'"):
        run_settings({"roundz": 3})
    with pytest.raises(ConfigError, match="node-config"):
        run_settings({"ranks": "2,4"})
    with pytest.raises(ConfigError) as e:  # in the run-config's words, not hlora run's flags
        run_settings({"clients": 2, "per-round": 3})
    assert str(e.value) == "run-config: per-round must be between 1 and clients (2), got 3"
    with pytest.raises(ConfigError, match=r"^run-config: dp-adaptive-clip .*dp-clip"):
        run_settings({"dp-adaptive-clip": 0.5})
    with pytest.raises(ConfigError, match=r"^run-config: strategy-options takes KEY=VALUE, got 'foo'"):
        run_settings({"strategy-options": "foo"})
    with pytest.raises(ConfigError, match="preset"):
        run_settings({"preset": "paper"})
    assert run_settings({"local-steps": 0})[0].local_steps is None  # 0: not set, as ""
    assert run_settings({"train-subset": 0})[0].train_subset is None
    cfg, options = run_settings({"train-subset": 3000, "labels": "0,1", "text-columns": "s", "label-column": "y"})
    with pytest.raises(ConfigError, match="nodes bring their own files"):
        shared_task(cfg, options.labels, with_dev=False)
    cfg, _ = run_settings({"task": "sst2", "train-subset": 3000})
    assert len(shared_task(cfg, None, with_dev=False).train) == 3000
    cfg, _ = run_settings({"task": "mrpc", "train-subset": 5000})  # one line, as every run-config mistake
    with pytest.raises(ConfigError, match="^run-config: train-subset 5000: the training set of mrpc has 3668"):
        shared_task(cfg, None, with_dev=False)


def test_node_config_mistakes_are_one_line():
    cfg, _ = run_settings({})
    assert node_settings({"rank": 4, "partition-id": 1, "num-partitions": 3}, cfg).lora_alpha == 16.0
    cases = [
        ({"partition-id": 0, "num-partitions": 2}, "'rank' is missing"),
        ({"rank": "eight", "data-file": "x.tsv"}, "rank must be an integer"),
        ({"rank": 4}, "give data-file, or partition-id and num-partitions"),
        ({"rank": 4, "partition-id": 3, "num-partitions": 3}, "partition-id must be in 0..2"),
        ({"rank": 4, "data_file": "x"}, "unknown key 'data_file'"),
    ]
    for node_config, message in cases:
        with pytest.raises(NodeConfigError, match=message):
            node_settings(node_config, cfg)


def incoming(content: RecordDict, message_type: str) -> Message:
    """A message as a ClientApp receives it from its SuperNode."""
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=600, message_type=message_type)
    return make_message(metadata, content)


def call_app(node_config: dict, run_config: dict, content: RecordDict, message_type: str) -> Message:
    """The ClientApp called as Flower calls it; the node serves the message in this process (``worker = false``)
    unless ``node_config`` says otherwise."""
    ctx = Context(run_id=1, node_id=7, node_config={"worker": False, **node_config}, state=RecordDict(),
                  run_config=run_config)
    return client_app.app(incoming(content, message_type), ctx)


@pytest.fixture
def tiny_run_config(tiny_model, tiny_mrpc) -> dict:
    train, dev = tiny_mrpc
    return {"task": "mrpc", "train": train, "dev": dev, "text-columns": "#1 String,#2 String",
            "label-column": "Quality", "model": tiny_model, "max-length": 48, "clients": 3, "per-round": 3,
            "precision": "fp32"}


def test_client_app_answers_a_query_or_says_what_is_wrong(tiny_run_config, tiny_mrpc, tmp_path):
    query = RecordDict({"hlora": ConfigRecord({})})
    reply = call_app({"rank": 4, "partition-id": 1, "num-partitions": 3}, tiny_run_config, query, "query")
    assert not reply.has_error()
    labels = load_task("mrpc", *tiny_mrpc, ["#1 String", "#2 String"], "Quality").train.labels
    n = len(partition(labels, 3, "dirichlet", 0.5, 0)[1])  # hlora run's default split
    share = [labels[i] for i in partition(labels, 3, "dirichlet", 0.5, 0)[1]]
    assert dict(reply.content.config_records["site"]) == {
        "rank": 4, "lora-alpha": 16.0, "num-examples": n, "labels": ["0", "1"], "partition-id": 1,
        "label-counts": [share.count(0), share.count(1)], "precision": "fp32",
    }
    bad = [
        ({"partition-id": 1, "num-partitions": 3}, "node-config: 'rank' is missing"),
        ({"rank": 4, "data-file": str(tmp_path / "nope.tsv")}, "does not exist"),
        ({"rank": 64, "partition-id": 0, "num-partitions": 3}, "rank 64 is above the width 32"),
    ]
    (tmp_path / "bad.tsv").write_text("a\tb\n1\t2\n")
    bad.append(({"rank": 4, "data-file": str(tmp_path / "bad.tsv")}, "cannot be read"))
    for node_config, reason in bad:
        reply = call_app(node_config, tiny_run_config, query, "query")
        assert reply.has_error() and reason in reply.error.reason and "\n" not in reply.error.reason


def test_client_app_trains_exactly_as_the_simulation(tiny_run_config, tiny_model, tiny_mrpc):
    task = load_task("mrpc", *tiny_mrpc, ["#1 String", "#2 String"], "Quality")
    model, tok = load_classifier(tiny_model, 2, 0)
    configure(model, RunConfig().dropout, RunConfig().attention)  # what the node applies at the defaults
    fm = FederatedModel(model)
    strategy = get_strategy("hlora")
    state = strategy.init_state(init_factors(fm.shapes, 8, torch.Generator().manual_seed(0)), fm.head_state())
    spec = ClientSpec(2, dict.fromkeys(fm.shapes, 8), 16.0, 16)
    payload = strategy.dispatch(state, spec, torch.Generator().manual_seed(client_seed(0, 1, 2, 1)))
    settings = TrainSettings(2, 1, client_seed(0, 1, 2), 1, 3e-4, 8)
    part = partition(task.train.labels, 3, "dirichlet", 0.5, 0)[2]
    reply = call_app({"rank": 8, "partition-id": 2, "num-partitions": 3}, tiny_run_config,
                     payload_to_record(payload, settings), "train")
    assert not reply.has_error(), reply.error
    got = record_to_update(wire(reply.content))
    expected = train_client(fm, payload, encode(tok, task.train, 48), part, client_id=2, epochs=1, lr=3e-4,
                            batch_size=8, seed=settings.seed)
    assert got.client == 2 and got.num_examples == len(part) == expected.num_examples
    for m in expected.lora:
        torch.testing.assert_close(got.lora[m].B, expected.lora[m].B, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.lora[m].A, expected.lora[m].A, rtol=1e-5, atol=1e-6)
    assert abs(got.train_loss - expected.train_loss) < 1e-5


def test_training_options_cross_the_wire_and_older_messages_read_as_defaults():
    strategy, state, clients = state_after_one_round("hlora")
    payload = strategy.dispatch(state, clients[0], torch.Generator().manual_seed(0))
    settings = TrainSettings(0, 3, 17, 2, 2.5e-4, 8, local_steps=5, prox_mu=0.01, logit_adjust=1.0,
                             label_counts=[30, 18])
    assert record_to_payload(wire(payload_to_record(payload, settings)))[1] == settings
    content = payload_to_record(payload, TrainSettings(0, 3, 17, 2, 2.5e-4, 8))
    config = content.config_records["config"]
    assert (config["local-steps"], config["label-counts"]) == (0, [])  # "none" on the wire
    for key in ("local-steps", "prox-mu", "logit-adjust", "label-counts"):  # a message of an older server
        del config[key]
    assert record_to_payload(wire(content))[1] == TrainSettings(0, 3, 17, 2, 2.5e-4, 8)


def test_client_app_trains_with_the_simulations_objective_and_steps(tiny_run_config, tiny_model, tiny_mrpc):
    """Logit adjustment from the federation's label counts, FedProx and local-steps, as the simulation."""
    task = load_task("mrpc", *tiny_mrpc, ["#1 String", "#2 String"], "Quality")
    labels = task.train.labels
    model, tok = load_classifier(tiny_model, 2, 0)
    configure(model, RunConfig().dropout, RunConfig().attention)  # what the node applies at the defaults
    fm = FederatedModel(model)
    strategy = get_strategy("hlora")
    state = strategy.init_state(init_factors(fm.shapes, 8, torch.Generator().manual_seed(0)), fm.head_state())
    spec = ClientSpec(1, dict.fromkeys(fm.shapes, 4), 16.0, 16)
    payload = strategy.dispatch(state, spec, torch.Generator().manual_seed(client_seed(0, 2, 1, 1)))
    part = partition(labels, 3, "dirichlet", 0.5, 0)[1]
    counts = [labels.count(c) for c in range(2)]
    settings = TrainSettings(1, 2, client_seed(0, 2, 1), 1, 3e-4, 8, local_steps=3, prox_mu=0.05,
                             logit_adjust=1.0, label_counts=counts)
    offset = logit_offset([labels[i] for i in part], labels, 2, 1.0)  # what the simulation computes
    own = [[labels[i] for i in part].count(c) for c in range(2)]
    assert torch.equal(offset_from_counts(own, counts, 1.0), offset)
    node = {"rank": 4, "partition-id": 1, "num-partitions": 3}
    reply = call_app(node, tiny_run_config, payload_to_record(payload, settings), "train")
    assert not reply.has_error(), reply.error
    got = record_to_update(wire(reply.content))
    expected = train_client(fm, payload, encode(tok, task.train, 48), part, client_id=1, epochs=1, lr=3e-4,
                            batch_size=8, seed=settings.seed, local_steps=3,
                            objective=Objective(offset=offset, prox_mu=0.05))
    plain = train_client(fm, payload, encode(tok, task.train, 48), part, client_id=1, epochs=1, lr=3e-4,
                         batch_size=8, seed=settings.seed, local_steps=3)
    for m in expected.lora:
        torch.testing.assert_close(got.lora[m].B, expected.lora[m].B, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.lora[m].A, expected.lora[m].A, rtol=1e-5, atol=1e-6)
    assert abs(got.train_loss - expected.train_loss) < 1e-5 and abs(got.train_loss - plain.train_loss) > 1e-4
    settings.label_counts = None  # logit adjustment without the federation's counts: a one-line error
    reply = call_app(node, tiny_run_config, payload_to_record(payload, settings), "train")
    assert reply.has_error() and "logit-adjust needs the federation's 2 label counts" in reply.error.reason


def test_auto_precision_is_the_nodes_choice_made_once_per_run(tiny_run_config, monkeypatch):
    calls = []

    def resolve(precision, step):  # a real probe at bf16, then the choice
        step("bf16")
        calls.append(precision)
        return "bf16"

    monkeypatch.setattr(node_site, "resolve_precision", resolve)
    run_config = {**tiny_run_config, "precision": "auto"}
    ctx = Context(run_id=1, node_id=7, node_config={"rank": 2, "partition-id": 0, "num-partitions": 3, "worker": False},
                  state=RecordDict(), run_config=run_config)
    query = RecordDict({"hlora": ConfigRecord({})})
    for _ in range(2):  # Flower starts a new ClientApp process per message: only the run state remains
        node_site._SITES.clear()
        reply = client_app.app(incoming(query, "query"), ctx)
        assert not reply.has_error(), reply.error
        assert reply.content.config_records["site"]["precision"] == "bf16"
    assert calls == ["auto"] and ctx.state[client_app.STATE_KEY]["precision"] == "bf16"
    node_site._SITES.clear()


def test_a_round_whose_nodes_are_all_unreachable_is_skipped_not_fatal():
    from hlora.engine.flower.server_app import GridExecutor, unreachable_round
    from hlora.engine.flower.transport import NodeUnavailable

    strategy, state, clients = state_after_one_round("hlora")
    cfg, _ = run_settings({})
    execute = GridExecutor(None, cfg, {0: 11, 1: 12}, 2, 30.0)
    execute.pairs = [(s, strategy.dispatch(state, s, torch.Generator().manual_seed(0))) for s in clients[:2]]
    execute.results = [NodeUnavailable("node 11 is offline"),
                       NodeUnavailable("node 12: no reply within 30 s")]
    outcome = unreachable_round(strategy, state, execute, cfg.privacy())
    assert outcome.skipped and not outcome.accepted and outcome.state.round == state.round + 1
    assert outcome.dp_clip is None  # no DP
    adaptive = dataclasses.replace(state, extra={**state.extra, CLIP_KEY: 0.3})  # C_t = 0.3, kept for the next round
    outcome = unreachable_round(strategy, adaptive, execute, DP(clip=1.0, noise=0.1, adaptive=0.5))
    assert outcome.dp_clip == 0.3 and outcome.state.extra[CLIP_KEY] == 0.3
    assert outcome.state.lora is state.lora
    assert [r["client"] for r in outcome.rejected] == [0, 1]
    assert "NodeUnavailable: node 12: no reply within 30 s" in outcome.rejected[1]["reason"]
    assert outcome.downlink_bytes == sum(strategy.downlink_bytes(state, p) for _, p in execute.pairs) > 0


def test_flower_app_training_defaults_are_hlora_runs():
    """flower-app/pyproject.toml repeats hlora run's defaults for training; a changed default must change both.

    The federation's shape (clients, per-round, rounds, partition) is the app's own: 3 nodes, IID.
    """
    from hlora.config import RunConfig

    app = tomli.loads((Path(__file__).parents[1] / "flower-app" / "pyproject.toml").read_text())
    config = app["tool"]["flwr"]["app"]["config"]
    defaults = RunConfig()
    own = {"clients", "per-round", "rounds", "partition", "out", "threads"}
    compared = 0
    for key, value in config.items():
        name = key.replace("-", "_")
        if key in own or not hasattr(defaults, name):
            continue
        expected = getattr(defaults, name)
        if value == "" and expected in (None, {}, []):
            continue
        if isinstance(expected, list):  # run-config values are scalars: a list is "a,b"
            expected = ",".join(map(str, expected))
        assert value == expected, f"flower-app {key} = {value!r}, hlora run's default is {expected!r}"
        compared += 1
    assert compared >= 20


def test_clients_are_numbered_by_partition_id_when_every_node_holds_one():
    from hlora.engine.flower.server_app import Node, in_client_order

    nodes = [Node(30, 8, 16.0, 10, 2), Node(10, 2, 16.0, 10, 0), Node(20, 4, 16.0, 10, 1)]
    assert [n.partition_id for n in in_client_order(nodes)] == [0, 1, 2]  # the simulation's clients 0, 1, 2
    own_file = [*nodes[:2], Node(20, 4, 16.0, 10, -1)]
    assert [n.node_id for n in in_client_order(own_file)] == [10, 20, 30]
    clash = [*nodes[:2], Node(20, 4, 16.0, 10, 0)]  # two nodes claim partition 0: no partition order
    assert [n.node_id for n in in_client_order(clash)] == [10, 20, 30]


def test_a_resumed_run_takes_the_stopped_runs_run_config(tmp_path):
    from hlora.engine.flower.settings import resumed_run_config

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="no run there"):
        resumed_run_config({"resume": str(out)})
    out.mkdir()
    (out / "config.yaml").write_text("rounds: 4\n")
    with pytest.raises(ConfigError, match="holds no run-config"):
        resumed_run_config({"resume": str(out)})
    saved = {"rounds": 4, "model": "tiny", "round-timeout": 600.0, "out": "runs/x", "resume": ""}
    (out / "flower.json").write_text(json.dumps({"clients": [], "run_config": saved}))
    merged, ignored = resumed_run_config({"resume": str(out), "rounds": 5, "model": "tiny",
                                          "round-timeout": 30.0, "out": "elsewhere"})
    assert merged == {**saved, "round-timeout": 30.0, "out": str(out.resolve()), "resume": ""}
    assert ignored == ["rounds"]
    assert run_settings(merged)[1].resume is None
    (out / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="already finished"):
        resumed_run_config({"resume": str(out)})


def test_client_app_scores_the_global_model_on_the_share_it_holds_out(tiny_run_config, tiny_model, tiny_mrpc):
    """evaluate-on clients: the node holds out a seeded share (trains on the rest) and scores the global model
    on it as hlora.metrics.evaluate does in-process; by default it holds out nothing. The run-config the server
    sends in a message wins over the one Flower gives the node (a resumed run's nodes get the stopped run's)."""
    from hlora.engine.flower.server_app import client_eval_row
    from hlora.engine.flower.settings import held_out
    from hlora.metrics import evaluate

    node = {"rank": 4, "partition-id": 1, "num-partitions": 3}
    task = load_task("mrpc", *tiny_mrpc, ["#1 String", "#2 String"], "Quality")
    share = task.train.subset(partition(task.train.labels, 3, "dirichlet", 0.5, 0)[1])
    query = RecordDict({"hlora": ConfigRecord({})})
    sites = {}
    for evaluate_on in ("server", "clients"):
        reply = call_app(node, {**tiny_run_config, "evaluate-on": evaluate_on}, query, "query")
        sites[evaluate_on] = reply.content.config_records["site"]
    train, held = held_out(share, 0.2, 0, 1)
    assert sites["server"]["num-examples"] == len(share) and sites["clients"]["num-examples"] == len(train)
    assert len(held) == round(0.2 * len(share)) and sorted(train.text_a + held.text_a) == sorted(share.text_a)
    assert held_out(share, 0.2, 0, 1)[1].text_a == held.text_a and held_out(share, 0.2, 1, 1)[1].text_a != held.text_a

    model, tok = load_classifier(tiny_model, 2, 0)
    configure(model, RunConfig().dropout, RunConfig().attention)
    fm = FederatedModel(model)
    adapter = init_factors(fm.shapes, 4, torch.Generator().manual_seed(3))
    for f in adapter.values():
        f.B.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))  # a non-zero update
    head = {k: v + 0.1 for k, v in fm.head_state().items()}
    content = payload_to_record(Payload(adapter, head), TrainSettings(1, 2, 0, 0, 0.0, 16))
    content["run-config"] = ConfigRecord({**tiny_run_config, "evaluate-on": "both"})
    reply = call_app(node, tiny_run_config, content, "evaluate")  # the context's says server: the message wins
    assert not reply.has_error(), reply.error
    got = dict(reply.content.config_records["eval"])
    expected = evaluate(fm, adapter, head, encode(tok, held, 48), 16, task.f1_label)
    assert got["client"] == 1 and got["examples"] == len(held)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    row = client_eval_row({1: 7}, [reply], lm=False)  # the server's row: a classifier's keys, as before
    assert row == {"client_accuracy": got["accuracy"], "client_eval_loss": got["eval_loss"], "client_eval": [
        {"client": 1, "node": 7, "examples": len(held), **{k: got[k] for k in ("accuracy", "eval_loss", "f1")}}]}
    reply = call_app(node, tiny_run_config, payload_to_record(Payload(adapter, head), TrainSettings(1, 2, 0, 0, 0.0, 16)),
                     "evaluate")
    assert reply.has_error() and "evaluate-on is server" in reply.error.reason
    with pytest.raises(ConfigError, match="evaluate-on must be one of"):
        run_settings({"evaluate-on": "nodes"})
    with pytest.raises(ConfigError, match='personal-eval: on Flower .* evaluate-on = "clients"'):
        run_settings({"personal-eval": True})
    assert not run_settings({"personal-eval": False})[0].personal_eval


#: `hlora run` options that flower-app/pyproject.toml does not list, and why
NOT_IN_THE_APP = {
    **dict.fromkeys(("ranks", "rank-policy", "rank-file", "layer-ranks"), "each node gives its rank in --node-config"),
    **dict.fromkeys(("attack", "attackers", "attack-lambda"), "attacks are simulated by hlora run only"),
    "preset": "the app lists every key with its value: refused by run_settings",
    "personal-eval": "the nodes score the global model on a held-out share with evaluate-on clients",
}
#: `hlora run` options the app spells otherwise
RENAMED = {"strategy-option": "strategy-options"}  # repeated on the command line, one string in the run-config


def test_the_flower_app_keys_are_hlora_run_options():
    """A run-config key of flower-app/pyproject.toml is an `hlora run` option (same name, dashes) or one of the
    Flower engine's own keys (settings.FLOWER_DEFAULTS, listed with their defaults); every `hlora run` option
    is in the app, or in NOT_IN_THE_APP with its reason. An option added to `hlora run` (or a key to the app)
    without the other fails here until it is added, or listed with the reason it does not apply."""
    from typer.main import get_command

    from hlora.cli import app as cli
    from hlora.engine.flower.settings import FLOWER_DEFAULTS

    run = get_command(cli).commands["run"]
    options = {o[2:] for p in run.params for o in p.opts if o.startswith("--")}
    keys = tomli.loads(APP.read_text())["tool"]["flwr"]["app"]["config"]
    assert set(NOT_IN_THE_APP) | set(RENAMED) <= options, "NOT_IN_THE_APP names an option hlora run lost"
    missing = sorted(options - set(keys) - set(NOT_IN_THE_APP) - set(RENAMED))
    assert not missing, f"hlora run options missing from flower-app/pyproject.toml: {missing}"
    unknown = sorted(set(keys) - options - set(FLOWER_DEFAULTS) - set(RENAMED.values()))
    assert not unknown, f"flower-app/pyproject.toml keys that are no hlora run option: {unknown}"
    assert not set(NOT_IN_THE_APP) & set(keys), "a key is both in the app and listed as not in it"
    for key, default in FLOWER_DEFAULTS.items():
        assert keys.get(key) == default, f"flower-app {key} = {keys.get(key)!r}, the engine's default {default!r}"


def test_a_kept_entry_crosses_the_wire_bit_for_bit_and_a_partition_node_holds_out_the_simulations_share(tiny_mrpc):
    """fedsa's kept entry (B per module; a personal head, or none when it is shared) as an ArrayRecord and back,
    through Flower's serialisation; and node k of a split holds out what hlora run's client k holds out."""
    from hlora.client_state import split_holdout
    from hlora.engine.flower.node_site import personal_split
    from hlora.engine.flower.records import KEPT_KEY, kept_to_record, record_to_kept

    assert client_app.KEPT_KEY == KEPT_KEY
    for head in ({"classifier.weight": torch.randn(2, 6), "classifier.bias": torch.randn(2)}, {}):
        entry = {"B": {m: torch.randn(d, 3) for m, (d, _) in SHAPES.items()}, "head": head}
        back = record_to_kept(wire(RecordDict({KEPT_KEY: kept_to_record(entry)})).array_records[KEPT_KEY])
        assert back.keys() == entry.keys() and back["head"].keys() == head.keys()
        for part in ("B", "head"):
            for k, t in entry[part].items():
                assert torch.equal(back[part][k], t) and back[part][k].dtype == t.dtype
    task = load_task("mrpc", *tiny_mrpc, ["#1 String", "#2 String"], "Quality")
    parts = RunConfig(clients=3, partition="iid").client_parts(task)
    train, held = split_holdout(parts, 0.25, 7)
    for k, part in enumerate(parts):
        mine = personal_split(task.train.subset(part), 0.25, 7, k)
        assert (mine[0].text_a, mine[0].labels) == (task.train.subset(train[k]).text_a, task.train.subset(train[k]).labels)
        assert (mine[1].text_a, mine[1].labels) == (task.train.subset(held[k]).text_a, task.train.subset(held[k]).labels)
        assert len(mine[1]) >= 1
