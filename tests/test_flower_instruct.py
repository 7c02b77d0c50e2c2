"""The Flower engine serving --task instruct (decoder LMs), without a network: the ClientApp in-process.

A node answers a query (no labels, no label counts: an LM has none) and trains a received payload on its
share of the run's training JSONL (partition-id: the simulation's split by category) or on its own
data-file (field names from the run-config), exactly as ``train_client`` does in ``hlora run``; with
evaluate-on clients or both it holds out a share of its examples and scores the global adapter's eval loss on it.
"""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from hlora.client import train_client
from hlora.config import ConfigError
from hlora.data import Fields, encode_instruct, load_task
from hlora.data.instruct import read_instruct
from hlora.engine.flower import node_site
from hlora.engine.flower.records import TrainSettings, payload_to_record, record_to_update
from hlora.engine.flower.settings import held_out, run_settings, shared_task
from hlora.factors import init_factors
from hlora.metrics import evaluate_lm
from hlora.model import FederatedModel
from hlora.server import client_seed
from hlora.strategies import ClientSpec, Payload, get_strategy
from hlora.tasks import load_model
from hlora.toy import synthetic_instructions, write_jsonl
from tests.test_flower_records import call_app, wire
from tests.test_instruct import tiny_decoder  # noqa: F401 - the session's tiny Llama and instruction set

MODULES = "q_proj,k_proj,v_proj,o_proj"


@pytest.fixture
def instruct_run_config(tiny_decoder) -> dict:  # noqa: F811
    model, train, dev = tiny_decoder
    return {"task": "instruct", "train": train, "dev": dev, "model": model, "target-modules": MODULES,
            "max-length": 64, "clients": 3, "per-round": 3, "precision": "fp32", "threads": 1,
            "logit-adjust": 1.0}  # the app's default: it does not apply to an LM


@pytest.fixture(autouse=True)
def fresh_sites():
    """Every test loads its sites itself (and leaves none behind), with torch's threads restored."""
    threads = torch.get_num_threads()
    node_site._SITES.clear()
    yield
    node_site._SITES.clear()
    torch.set_num_threads(threads)


def train_round(run_config: dict, rank: int, client: int, rnd: int = 1):
    """The simulation's model (as hlora run loads it) and client ``client``'s payload of round ``rnd``."""
    cfg, options = run_settings(run_config)
    fm = FederatedModel(load_model(cfg, shared_task(cfg, options.labels, with_dev=False))[0], cfg.target_modules)
    strategy = get_strategy("hlora")
    state = strategy.init_state(init_factors(fm.shapes, 4, torch.Generator().manual_seed(0)), fm.head_state())
    spec = ClientSpec(client, dict.fromkeys(fm.shapes, rank), 16.0, 10)
    payload = strategy.dispatch(state, spec, torch.Generator().manual_seed(client_seed(0, rnd, client, 1)))
    # the server sends no logit adjustment for an LM; a node ignores one anyway (hlora run does too)
    settings = TrainSettings(client, rnd, client_seed(0, rnd, client), 1, 1e-2, 8, logit_adjust=1.0)
    return cfg, fm, payload, settings


def test_a_node_serves_its_share_of_the_instruction_set_as_the_simulation(instruct_run_config, tiny_decoder):  # noqa: F811
    from transformers import AutoTokenizer

    model, train, dev = tiny_decoder
    node = {"rank": 2, "partition-id": 1, "num-partitions": 3}
    reply = call_app(node, instruct_run_config, RecordDict({"hlora": ConfigRecord({})}), "query")
    assert not reply.has_error(), reply.error
    cfg, _ = run_settings(instruct_run_config)
    task = load_task("instruct", train, dev, fields=Fields())
    part = cfg.client_parts(task, 3)[1]  # hlora run's split (dirichlet over the categories)
    assert dict(reply.content.config_records["site"]) == {
        "rank": 2, "lora-alpha": 16.0, "num-examples": len(part), "labels": [], "partition-id": 1,
        "precision": "fp32",
    }  # no label counts: the server asks none of an LM

    cfg, fm, payload, settings = train_round(instruct_run_config, 2, 1)
    reply = call_app(node, instruct_run_config, payload_to_record(payload, settings), "train")
    assert not reply.has_error(), reply.error
    got = record_to_update(wire(reply.content))
    tok = AutoTokenizer.from_pretrained(model)
    expected = train_client(fm, payload, encode_instruct(tok, task.train, 64), part, client_id=1, epochs=1,
                            lr=1e-2, batch_size=8, seed=settings.seed)
    assert got.client == 1 and got.num_examples == len(part) == expected.num_examples and not got.head
    for m in expected.lora:
        assert got.lora[m].rank == 2
        torch.testing.assert_close(got.lora[m].B, expected.lora[m].B, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.lora[m].A, expected.lora[m].A, rtol=1e-5, atol=1e-6)
    assert abs(got.train_loss - expected.train_loss) < 1e-5 and got.train_loss > 0


def test_a_node_serves_its_own_instruction_file_with_the_run_configs_fields(instruct_run_config, tiny_decoder,  # noqa: F811
                                                                            tmp_path):
    from transformers import AutoTokenizer

    model, _, _ = tiny_decoder
    rows = [{"q": r["instruction"], "ctx": r["context"], "a": r["response"]} for r in synthetic_instructions(10, 7)]
    own = write_jsonl(tmp_path / "site.jsonl", rows)
    run_config = {**instruct_run_config, "train": "", "prompt-field": "q", "input-field": "ctx",
                  "response-field": "a"}  # no shared training set: every node brings its own file
    node = {"rank": 3, "data-file": str(own)}
    reply = call_app(node, run_config, RecordDict({"hlora": ConfigRecord({})}), "query")
    assert not reply.has_error(), reply.error
    site = reply.content.config_records["site"]
    assert (site["num-examples"], site["partition-id"], list(site["labels"])) == (10, -1, [])

    _, fm, payload, settings = train_round(run_config, 3, 0, rnd=2)
    reply = call_app(node, run_config, payload_to_record(payload, settings), "train")
    assert not reply.has_error(), reply.error
    got = record_to_update(wire(reply.content))
    examples, _ = read_instruct(own, Fields(prompt="q", input="ctx", response="a"))
    tok = AutoTokenizer.from_pretrained(model)
    expected = train_client(fm, payload, encode_instruct(tok, examples, 64), list(range(10)), client_id=0,
                            epochs=1, lr=1e-2, batch_size=8, seed=settings.seed)
    for m in expected.lora:
        torch.testing.assert_close(got.lora[m].B, expected.lora[m].B, rtol=1e-5, atol=1e-6)
    assert abs(got.train_loss - expected.train_loss) < 1e-5

    wrong = {**run_config, "response-field": "answer"}  # a field the file does not have: one line
    reply = call_app(node, wrong, RecordDict({"hlora": ConfigRecord({})}), "query")
    assert reply.has_error() and "no field 'answer'" in reply.error.reason and "\n" not in reply.error.reason
    reply = call_app({"rank": 3, "partition-id": 0, "num-partitions": 3}, run_config,
                     RecordDict({"hlora": ConfigRecord({})}), "query")
    assert reply.has_error() and "partition-id needs a training set" in reply.error.reason


def test_classifier_only_run_config_keys_are_refused_for_instruct(instruct_run_config):
    for evaluate_on in ("clients", "both"):  # the nodes score an LM's eval loss on their held-out shares
        _, options = run_settings({**instruct_run_config, "evaluate-on": evaluate_on})
        assert options.clients_evaluate and options.evaluate_on == evaluate_on
    for bad, reason in (({"evaluate-on": "nodes"}, "evaluate-on must be one of server, clients, both"),
                        ({"evaluate-on": "both", "client-eval-fraction": 1.0}, "client-eval-fraction must be in")):
        with pytest.raises(ConfigError, match=reason) as e:
            run_settings({**instruct_run_config, **bad})
        assert "\n" not in str(e.value)
    cfg, options = run_settings({**instruct_run_config, "labels": "0,1"})
    with pytest.raises(ConfigError, match="task instruct has none"):
        shared_task(cfg, options.labels, with_dev=True)
    cfg, options = run_settings(instruct_run_config)
    task = shared_task(cfg, options.labels, with_dev=True)
    assert task.kind == "instruct" and len(task.train) == 96 and len(task.dev) == 12
    assert len(shared_task(cfg, None, with_dev=False).dev) == 0  # a node never reads the dev set


def global_lm_payload(fm: FederatedModel) -> Payload:
    """A global adapter with a non-zero update (B != 0) and no head (an LM has none)."""
    adapter = init_factors(fm.shapes, 4, torch.Generator().manual_seed(3))
    for f in adapter.values():
        f.B.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
    return Payload(adapter, {})


def heldout_share(run_config: dict, tiny_decoder, partition_id: int, fraction: float):  # noqa: F811
    """What node ``partition_id`` of 3 holds out of its share of the training JSONL, and what it trains on."""
    model, train, dev = tiny_decoder
    cfg, _ = run_settings(run_config)
    task = load_task("instruct", train, dev, fields=Fields())
    share = task.train.subset(cfg.client_parts(task, 3)[partition_id])
    return held_out(share, fraction, cfg.seed, partition_id)


def node_evaluates(node: dict, run_config: dict, payload: Payload, client: int) -> Message:
    """The node's reply to an evaluate message holding ``payload`` (eval batch size 16)."""
    return call_app(node, run_config, payload_to_record(payload, TrainSettings(client, 2, 0, 0, 0.0, 16)),
                    "evaluate")


def test_an_instruct_node_scores_the_global_adapter_on_the_share_it_holds_out(instruct_run_config,
                                                                             tiny_decoder):  # noqa: F811
    """evaluate-on both: the node holds out the seeded client-eval-fraction of its instruction examples (the
    classifier's rule; it trains on the rest) and answers an evaluate message with the eval loss the server
    scores its dev set with (hlora.metrics.evaluate_lm, no generation), perplexity and the number of examples."""
    from transformers import AutoTokenizer

    run_config = {**instruct_run_config, "evaluate-on": "both", "client-eval-fraction": 0.25}
    node = {"rank": 2, "partition-id": 1, "num-partitions": 3}
    train, held = heldout_share(run_config, tiny_decoder, 1, 0.25)
    assert len(held) == round(0.25 * (len(train) + len(held))) and len(train) > len(held) > 1
    reply = call_app(node, run_config, RecordDict({"hlora": ConfigRecord({})}), "query")
    assert not reply.has_error(), reply.error
    assert reply.content.config_records["site"]["num-examples"] == len(train)

    _, fm, _, _ = train_round(run_config, 2, 1)
    payload = global_lm_payload(fm)
    reply = node_evaluates(node, run_config, payload, 1)
    assert not reply.has_error(), reply.error
    got = dict(wire(reply.content).config_records["eval"])
    assert set(got) == {"client", "examples", "eval_loss", "perplexity"}  # no accuracy, no ROUGE-L
    data = encode_instruct(AutoTokenizer.from_pretrained(tiny_decoder[0]), held, 64)
    expected = evaluate_lm(fm, payload.lora, data, 16, None, [], 0, 1)
    assert got["client"] == 1 and got["examples"] == len(held)
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(got["eval_loss"]), rel=1e-5)
    base = init_factors(fm.shapes, 4, torch.Generator().manual_seed(3))  # B = 0: the base model's loss differs
    assert expected["eval_loss"] != pytest.approx(evaluate_lm(fm, base, data, 16, None, [], 0, 1)["eval_loss"])


def test_the_server_weighs_the_instruct_nodes_eval_losses_by_their_held_out_examples(instruct_run_config,
                                                                                     tiny_decoder):  # noqa: F811
    """client_eval_row over two nodes' real replies and one that failed: client_eval_loss is the nodes' eval
    losses weighted by their held-out examples (as for classifiers), client_perplexity its exp; each
    client_eval entry holds client, node, examples and eval_loss (no accuracy). A reply without eval_loss is a
    failure of that node."""
    from hlora.engine.flower.server_app import client_eval_row
    from hlora.engine.flower.transport import NodeFailure
    from tests.test_flower_records import incoming

    run_config = {**instruct_run_config, "evaluate-on": "clients"}
    _, fm, _, _ = train_round(run_config, 2, 0)
    payload = global_lm_payload(fm)
    replies: list = [node_evaluates({"rank": r, "partition-id": i, "num-partitions": 3}, run_config, payload, i)
                     for i, r in ((0, 2), (1, 4))]
    assert not any(r.has_error() for r in replies)
    scores = [dict(r.content.config_records["eval"]) for r in replies]
    sizes = [len(heldout_share(run_config, tiny_decoder, i, 0.2)[1]) for i in (0, 1)]
    assert [s["examples"] for s in scores] == sizes and sizes[0] != sizes[1]
    replies.append(NodeFailure("node 13 is offline"))
    replies.append(incoming(RecordDict({"eval": ConfigRecord({"client": 3, "examples": 5})}), "evaluate"))
    row = client_eval_row({0: 11, 1: 12, 2: 13, 3: 14}, replies, lm=True)
    weighted = (scores[0]["eval_loss"] * sizes[0] + scores[1]["eval_loss"] * sizes[1]) / sum(sizes)
    assert row["client_eval_loss"] == pytest.approx(weighted, rel=1e-12)
    assert row["client_eval_loss"] != pytest.approx((scores[0]["eval_loss"] + scores[1]["eval_loss"]) / 2)
    assert row["client_perplexity"] == pytest.approx(math.exp(weighted), rel=1e-12)
    assert "client_accuracy" not in row
    assert row["client_eval"] == [{"client": i, "node": 11 + i, "examples": sizes[i],
                                   "eval_loss": scores[i]["eval_loss"]} for i in (0, 1)]
    assert [(f["client"], f["node"]) for f in row["client_eval_failed"]] == [(2, 13), (3, 14)]
    assert "offline" in row["client_eval_failed"][0]["reason"]
    assert "without eval_loss" in row["client_eval_failed"][1]["reason"]


class InProcessGrid:
    """A Grid whose nodes are ClientApps in this process (``exchange`` is patched to call them); the nodes
    serve their messages in this process too (``worker = false``), unless their node-config says otherwise."""

    def __init__(self, nodes: dict[int, dict]) -> None:
        self.nodes = {node: {"worker": False, **config} for node, config in nodes.items()}

    def get_node_ids(self) -> list[int]:
        return sorted(self.nodes)


def in_process_exchange(sent: list[str]):
    """``exchange`` for an :class:`InProcessGrid`: each message crosses the wire as bytes to the node's
    ClientApp, called in this process; ``sent`` collects the message kinds."""
    from flwr.app import Context

    from hlora.engine.flower import client_app
    from hlora.engine.flower.transport import NodeFailure
    from tests.test_flower_records import incoming

    def exchange(grid, contents, kind, timeout, group_id=None):
        replies = []
        for node_id, content in contents:
            sent.append(kind)
            ctx = Context(run_id=1, node_id=node_id, node_config=grid.nodes[node_id], state=RecordDict(),
                          run_config={})
            reply = client_app.app(incoming(wire(content), kind), ctx)
            replies.append(NodeFailure(reply.error.reason) if reply.has_error() else reply)
        return replies

    return exchange


def test_the_server_app_runs_an_instruct_federation_as_the_simulation(instruct_run_config, tmp_path, monkeypatch,
                                                                      capsys):
    """run_federation over 3 in-process nodes (partition ids 0..2, ranks 2, 4, 8; messages cross the wire
    as bytes): the rows (eval loss, perplexity, ROUGE-L, train loss), summary and final adapter equal those
    of hlora run with the same settings, and the logit adjustment of the app's default is not applied."""
    import json

    from hlora import load_config, run
    from hlora.checkpoint import load_checkpoint
    from hlora.engine.flower import server_app
    from tests.test_cli import run_cli

    ranks = (2, 4, 8)
    grid = InProcessGrid({11 + i: {"rank": r, "partition-id": i, "num-partitions": 3, "threads": 1}
                          for i, r in enumerate(ranks)})
    sent: list[str] = []
    monkeypatch.setattr(server_app, "exchange", in_process_exchange(sent))
    options = {"rounds": 2, "local-epochs": 1, "batch-size": 8, "partition": "iid", "lr": 1e-2,
               "gen-samples": 2, "max-new-tokens": 6, "lr-schedule": "constant", "seed": 0}
    out = tmp_path / "flower"
    summary = server_app.run_federation(grid, {**instruct_run_config, **options, "out": str(out)})
    assert sent == ["query"] * 3 + ["train"] * 6

    sim = run(load_config(None, {
        **{k.replace("-", "_"): v for k, v in {**instruct_run_config, **options}.items()},
        "ranks": ",".join(map(str, ranks)), "out": str(tmp_path / "simulation")}))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(sim.rows) == 2
    for got, expected in zip(rows, sim.rows):
        assert "accuracy" not in got and not got["rejected"]
        for key in ("round", "clients", "ranks", "uplink_bytes", "downlink_bytes"):
            assert got[key] == expected[key], key
        for key in ("eval_loss", "perplexity", "train_loss", "rouge_l"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    assert summary["final_eval_loss"] == rows[-1]["eval_loss"] and "final_rouge_l" in summary
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert not (out / "dev_predictions.json").exists()
    flower = json.loads((out / "flower.json").read_text())
    assert [c["label_counts"] for c in flower["clients"]] == [None] * 3
    strategy = get_strategy("hlora")
    mine, _ = load_checkpoint(out)
    theirs, _ = load_checkpoint(sim.out)
    for m, f in strategy.global_adapter(theirs).items():
        torch.testing.assert_close(strategy.global_adapter(mine)[m].delta(), f.delta(), rtol=1e-5, atol=1e-6)
    code, text = run_cli(["eval", str(out)], capsys)  # hlora eval reads a Flower LM run as a simulated one
    assert code in (None, 0) and f"eval_loss {rows[-1]['eval_loss']:.4f}" in text


def test_the_server_app_takes_an_instruct_federations_scores_from_its_nodes(instruct_run_config, tiny_decoder,  # noqa: F811
                                                                           tmp_path, monkeypatch):
    """evaluate-on clients, 1 round over 3 in-process nodes: after training, each node scores the global
    adapter on its held-out share; the row has the nodes' eval losses (each the global adapter's, scored
    directly on that share), client_eval_loss weighted by their examples and client_perplexity, and no
    server scores; summary.json the final and best client_eval_loss."""
    import json

    from transformers import AutoTokenizer

    from hlora.checkpoint import load_checkpoint
    from hlora.engine.flower import server_app

    grid = InProcessGrid({11 + i: {"rank": r, "partition-id": i, "num-partitions": 3, "threads": 1}
                          for i, r in enumerate((2, 4, 8))})
    sent: list[str] = []
    monkeypatch.setattr(server_app, "exchange", in_process_exchange(sent))
    run_config = {**instruct_run_config, "rounds": 1, "local-epochs": 1, "batch-size": 8, "lr": 1e-2,
                  "evaluate-on": "clients", "out": str(tmp_path / "flower")}
    summary = server_app.run_federation(grid, run_config)
    assert sent == ["query"] * 3 + ["train"] * 3 + ["evaluate"] * 3
    (row,) = [json.loads(line) for line in (tmp_path / "flower" / "metrics.jsonl").read_text().splitlines()]
    assert "eval_loss" not in row and "client_accuracy" not in row and "client_eval_failed" not in row
    held = [heldout_share(run_config, tiny_decoder, i, 0.2)[1] for i in range(3)]
    assert [(e["client"], e["node"], e["examples"]) for e in row["client_eval"]] == \
        [(i, 11 + i, len(h)) for i, h in enumerate(held)]
    _, fm, _, _ = train_round(run_config, 2, 0)
    adapter = get_strategy("hlora").global_adapter(load_checkpoint(tmp_path / "flower")[0])
    tok = AutoTokenizer.from_pretrained(tiny_decoder[0])
    for e, h in zip(row["client_eval"], held):
        expected = evaluate_lm(fm, adapter, encode_instruct(tok, h, 64), 128, None, [], 0, 1)
        assert e["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)
    n = sum(len(h) for h in held)
    assert row["client_eval_loss"] == pytest.approx(sum(e["eval_loss"] * e["examples"] for e in row["client_eval"]) / n)
    assert row["client_perplexity"] == pytest.approx(math.exp(row["client_eval_loss"]))
    assert summary["final_client_eval_loss"] == summary["best_client_eval_loss"] == row["client_eval_loss"]


def test_a_node_worker_serves_instruct_as_the_in_process_client_app(instruct_run_config):
    """worker=true: the query (an empty label list) and a train message of an LM site are answered as the
    ClientApp answers them in its own process, bit for bit; the worker is stopped after."""
    import os
    import shutil
    import signal
    import tempfile

    from flwr.app import Context

    from hlora.engine.flower import client_app
    from hlora.engine.flower.node_worker import WorkerOptions, WorkerPaths
    from tests.test_node_worker import message, same_content, worker_pids

    node = {"rank": 2, "partition-id": 0, "num-partitions": 3, "threads": 1}
    folder = tempfile.mkdtemp(prefix="hw-")  # a Unix socket path has at most 107 bytes
    on = {**node, "worker": True, "worker-dir": folder, "worker-idle": 60}
    _, _, payload, settings = train_round(instruct_run_config, 2, 0)
    messages = [(RecordDict({"hlora": ConfigRecord({})}), "query"), (payload_to_record(payload, settings), "train")]
    try:
        replies = {}
        for flag, config in ((True, on), (False, {**node, "worker": False})):
            ctx = Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config=instruct_run_config)
            replies[flag] = [client_app.app(message(c, kind), ctx) for c, kind in messages]
        for got, expected in zip(replies[True], replies[False]):
            assert not got.has_error() and not expected.has_error(), (got.error if got.has_error() else expected.error)
            same_content(got.content, expected.content)
        assert list(replies[True][0].content.config_records["site"]["labels"]) == []
        pids = worker_pids(WorkerPaths.of(WorkerOptions(True, 60, folder), 7, 1, instruct_run_config, on).log)
        assert len(pids) == 2 and len(set(pids)) == 1
        os.kill(pids[0], signal.SIGTERM)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_servers_auto_precision_times_an_lms_eval_loss(instruct_run_config, monkeypatch):
    from hlora.engine.flower import server_app

    cfg, options = run_settings({**instruct_run_config, "precision": "auto"})
    task = shared_task(cfg, options.labels, with_dev=True)
    model, tokenizer = load_model(cfg, task)
    fm = FederatedModel(model, cfg.target_modules)
    dev = node_site.tokenize(task, tokenizer, task.dev, cfg.max_length)
    timed = []

    def resolve(precision, step):  # the probe runs (eval loss of a few dev batches, no generation)
        step("fp32")
        timed.append(precision)
        return "fp32"

    monkeypatch.setattr(server_app, "resolve_precision", resolve)
    assert server_app.server_precision(cfg, fm, dev) == "fp32" and timed == ["auto"]
