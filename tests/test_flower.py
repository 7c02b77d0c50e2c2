"""hlora on Flower's Deployment Engine, on loopback: a SuperLink and 3 SuperNodes of ranks 2, 4, 8.

Each test starts real ``flower-superlink`` / ``flower-supernode`` processes on 127.0.0.1 with free ports,
submits the hlora app with ``flwr run``, waits for the run's final status with ``flwr list``, checks the
outputs against what the in-process code computes from the same inputs, and stops every process it
started (also Flower's own children), checking that none is left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from hlora.checkpoint import load_checkpoint
from hlora.client import train_client
from hlora.config import ConfigError, load_config
from hlora.data import encode, load_task, partition
from hlora.engine import simulation
from hlora.inference import load_run
from hlora.model import FederatedModel, configure, load_classifier
from hlora.server import client_seed
from hlora.strategies import get_strategy
from tests.flower_cluster import Cluster
from tests.test_instruct import tiny_decoder  # noqa: F401 - the session's tiny Llama and instruction set

#: every test here starts real Flower processes: `pytest -m "not slow"` leaves them out (CI runs them)
pytestmark = pytest.mark.slow

RANKS = (2, 4, 8)
TEXT = ["#1 String", "#2 String"]


@pytest.fixture(scope="module")
def sites(tiny_mrpc, tmp_path_factory) -> dict[int, str]:
    """Node configs by rank: two nodes take an IID share of the run's training file, the third reads
    the same share from a data file of its own."""
    train, _ = tiny_mrpc
    labels = load_task("mrpc", *tiny_mrpc, TEXT, "Quality").train.labels
    share = partition(labels, 3, "iid", 0.5, 0)[2]
    lines = Path(train).read_text(encoding="utf-8").splitlines()
    own = tmp_path_factory.mktemp("site") / "site-train.tsv"
    own.write_text("\n".join([lines[0], *(lines[i + 1] for i in share)]) + "\n", encoding="utf-8")
    return {
        2: "rank=2 partition-id=0 num-partitions=3 threads=1",
        4: "rank=4 partition-id=1 num-partitions=3 threads=1",
        8: f'rank=8 data-file="{own}" threads=1',
    }


#: the papers' training, pinned: check_run recomputes each node's round with plain train_client and the
#: strategy's own aggregate (hlora run's defaults add logit adjustment, an SGD head and server momentum)
PINNED = {"precision": "fp32", "lr-schedule": "constant", "logit-adjust": 0.0, "head-opt": "adamw", "head-lr": 0.001, "adam-eps": 1e-8,
          "server-opt": "avg", "server-lr": 1.0, "client-weights": "examples"}


def run_config(tiny_model, tiny_mrpc, out: Path, data: dict[str, Any] | None = None, **extra) -> str:
    """The run-config of a test run; ``data``: the task, data, model and max-length keys in place of the tiny
    MRPC's (e.g. :func:`instruct_data`)."""
    train, dev = tiny_mrpc
    values = {
        **(data or {"task": "mrpc", "train": train, "dev": dev, "text-columns": ",".join(TEXT),
                    "label-column": "Quality", "model": tiny_model, "max-length": 48}),
        "clients": 3, "per-round": 3, "rounds": 2, "local-epochs": 1,
        "batch-size": 8, "partition": "iid", "threads": 1, "out": str(out), "save-updates": True,
        "round-timeout": 120.0, "node-timeout": 60.0, **PINNED, **extra,
    }
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def start(cluster: Cluster, sites: dict[int, str]) -> Cluster:
    cluster.start_superlink()
    for rank, node_config in sites.items():
        cluster.start_node(f"rank{rank}", node_config)
    return cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, sites):
    """One insecure SuperLink with 3 SuperNodes, shared by the tests below (the last one kills a node)."""
    c = Cluster(tmp_path_factory.mktemp("flower"))
    try:
        yield start(c, sites)
    finally:
        left = c.close()
    assert not left, f"processes left running: {left}"


def client_data(tiny_model, tiny_mrpc, sites) -> dict[int, tuple]:
    """Each rank's training examples, tokenized in-process (the node reads them itself)."""
    task = load_task("mrpc", *tiny_mrpc, TEXT, "Quality")
    _, tok = load_classifier(tiny_model, 2, 0)
    share = partition(task.train.labels, 3, "iid", 0.5, 0)
    return {rank: encode(tok, task.train.subset(share[i]), 48) for i, rank in enumerate(sorted(sites))}


def check_run(out: Path, tiny_model, tiny_mrpc, sites, rounds: int = 2) -> None:
    """Outputs written; each round's aggregate equals the in-process strategy on the same updates; each
    node trained exactly what train_client computes in-process on its payload; the adapter is the model."""
    flower = json.loads((out / "flower.json").read_text())
    nodes = {c["client"]: c for c in flower["clients"]}
    assert sorted(c["rank"] for c in nodes.values()) == list(RANKS) and not flower["left_out"]
    assert [c["node_id"] for c in flower["clients"]] == sorted(c["node_id"] for c in flower["clients"])
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["client_ranks"] == [nodes[i]["rank"] for i in range(3)] and cfg["clients"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    for r in rows:
        assert r["clients"] == [0, 1, 2] and not r["rejected"] and not r["skipped"]
        assert r["nodes"] == [nodes[i]["node_id"] for i in range(3)]
        assert 0.0 <= r["accuracy"] <= 1.0 and r["uplink_bytes"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == rounds and summary["final_accuracy"] == rows[-1]["accuracy"]

    strategy = get_strategy("hlora")
    data = client_data(tiny_model, tiny_mrpc, sites)
    model, _ = load_classifier(tiny_model, 2, 0)
    configure(model, cfg["dropout"], cfg["attention"])  # the nodes' dropout and attention, as config.yaml has them
    fm = FederatedModel(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the nodes (threads=1)
    previous = None
    try:
        for rnd in range(1, rounds + 1):
            saved = torch.load(out / "updates" / f"round-{rnd}.pt", weights_only=False)
            before, after, updates = saved["before"], saved["after"], saved["updates"]
            if previous is not None:  # the rounds chain
                assert_same_adapter(strategy.global_adapter(before), strategy.global_adapter(previous), 0, 0)
            previous = after
            assert [u.client for u in updates] == [0, 1, 2]
            for spec, u in zip(saved["clients"], updates):
                draws = torch.Generator().manual_seed(client_seed(0, rnd, spec.id, 1))
                payload = strategy.dispatch(before, spec, draws)
                assert all(f.rank == nodes[spec.id]["rank"] for f in u.lora.values())
                mine = train_client(fm, payload, data[spec.ranks[next(iter(spec.ranks))]],
                                    list(range(u.num_examples)), client_id=spec.id, epochs=cfg["local_epochs"],
                                    lr=cfg["lr"], batch_size=cfg["batch_size"], seed=client_seed(0, rnd, spec.id))
                assert_same_adapter(u.lora, mine.lora, 1e-5, 1e-6)
            expected = strategy.aggregate(before, updates)
            assert_same_adapter(strategy.global_adapter(after), strategy.global_adapter(expected), 1e-6, 1e-7)
            for name, t in expected.head.items():
                torch.testing.assert_close(after.head[name], t, rtol=1e-6, atol=1e-7)
    finally:
        torch.set_num_threads(threads)

    written = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    final = strategy.global_adapter(previous)
    for m, f in final.items():
        B = written[f"base_model.model.{m}.lora_B.weight"]
        A = written[f"base_model.model.{m}.lora_A.weight"]
        torch.testing.assert_close(B @ A, f.delta(), rtol=1e-4, atol=1e-6)


def assert_same_adapter(a, b, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for m in a:
        torch.testing.assert_close(a[m].delta(), b[m].delta(), rtol=rtol, atol=atol)


def test_three_nodes_two_rounds_match_the_in_process_computation(cluster, tiny_model, tiny_mrpc, sites,
                                                                   tmp_path):
    out = tmp_path / "run"
    run = cluster.wait(cluster.run(run_config(tiny_model, tiny_mrpc, out)), timeout=300)
    assert run["status"] == "finished:completed", run
    check_run(out, tiny_model, tiny_mrpc, sites)


def test_the_same_with_tls_and_node_authentication_and_models_loaded_per_message(tmp_path, tiny_model, tiny_mrpc,
                                                                                 sites):
    """Also the path without node workers (``worker=false``: each message loads the model and data)."""
    cluster = Cluster(tmp_path / "tls", tls=True, node_auth=True)
    try:
        start(cluster, {rank: f"{node_config} worker=false" for rank, node_config in sites.items()})
        out = tmp_path / "run"
        run = cluster.wait(cluster.run(run_config(tiny_model, tiny_mrpc, out)), timeout=300)
        assert run["status"] == "finished:completed", run
        with socket.create_connection(("127.0.0.1", cluster.port)) as raw:  # the SuperLink speaks TLS
            context = ssl.create_default_context(cafile=str(cluster.certs["ca"]))
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.version().startswith("TLS")
        listed = cluster.flwr("supernode", "list", "test", "--format", "json")
        assert listed.returncode == 0 and listed.stdout.count('"node-id"') >= 3, listed.stdout
        check_run(out, tiny_model, tiny_mrpc, sites)
    finally:
        left = cluster.close()
    assert not left, f"processes left running: {left}"


def test_a_bad_run_config_fails_the_run_with_its_reason(cluster, tiny_model, tiny_mrpc, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    run = cluster.wait(cluster.run(run_config(tiny_model, tiny_mrpc, out)), timeout=120)
    assert run["status"] == "finished:failed" and "already holds a run" in run["status-details"]


def flower_and_simulation(tmp_path: Path, tiny_model, tiny_mrpc, node_config: str = "",
                          during: Callable[[Path], None] | None = None, data: dict[str, Any] | None = None,
                          **options) -> tuple[Path, Any]:
    """A Flower run of three nodes holding partition ids 0..2 (ranks RANKS), and ``hlora run`` of the same
    settings, whose clients 0..2 are those nodes (their data, ranks and seeds): the Flower run's directory and
    the simulation's result. ``options``: run-config keys (dashes) on top of :data:`PINNED`; ``node_config``:
    more node-config keys for every node (e.g. ``worker=true``); ``during(out)``: called once the run is
    submitted; ``data``: the task's keys in place of the tiny MRPC's (:func:`run_config`), in both runs."""
    sites = {r: f"rank={r} partition-id={i} num-partitions=3 threads=1 {node_config}".strip()
             for i, r in enumerate(RANKS)}
    cluster = Cluster(tmp_path / "flower")
    out = tmp_path / "flower-run"
    try:
        start(cluster, sites)
        run_id = cluster.run(run_config(tiny_model, tiny_mrpc, out, data, **options), wait=60)
        if during is not None:
            during(out)
        run = cluster.wait(run_id, timeout=300)
        assert run["status"] == "finished:completed", run
    finally:
        left = cluster.close()
    assert not left, f"processes left running: {left}"

    train, dev = tiny_mrpc
    cfg = load_config(None, {
        **({k.replace("-", "_"): v for k, v in data.items()} if data else {
            "task": "mrpc", "train": train, "dev": dev, "text_columns": TEXT, "label_column": "Quality",
            "model": tiny_model, "max_length": 48}),
        "clients": 3, "per_round": 3, "rounds": 2, "local_epochs": 1,
        "batch_size": 8, "partition": "iid", "ranks": ",".join(map(str, RANKS)), "threads": 1,
        "out": str(tmp_path / "simulation"),
        **{k.replace("-", "_"): v for k, v in {**PINNED, **options}.items()},
    })
    threads = torch.get_num_threads()
    try:
        sim = simulation.run(cfg)
    finally:
        torch.set_num_threads(threads)
    return out, sim


def test_logit_adjustment_local_steps_and_server_momentum_equal_the_simulation(tmp_path, tiny_model,
                                                                                 tiny_mrpc):
    """Every node holds a partition-id, so client i is the simulation's client i (its data, rank and
    seeds): a Flower run with logit adjustment (the federation's prior from the nodes' label counts),
    local steps, a cosine lr, FedProx and server momentum computes what ``hlora run`` computes."""
    # a node holds 16 examples: 2 steps of 8 are 1 of the 2 epochs. Each option moves the final adapter
    # beyond the tolerances below (checked in-process, dropping one at a time).
    options = {"logit-adjust": 1.0, "local-steps": 2, "local-epochs": 2, "server-opt": "avgm",
               "server-momentum": 0.9, "lr-schedule": "cosine", "prox-mu": 0.5}
    out, sim = flower_and_simulation(tmp_path, tiny_model, tiny_mrpc, **options)

    flower = json.loads((out / "flower.json").read_text())
    assert [(c["partition_id"], c["rank"]) for c in flower["clients"]] == list(enumerate(RANKS))
    labels = load_task("mrpc", *tiny_mrpc, TEXT, "Quality").train.labels
    counts = [sum(c["label_counts"][k] for c in flower["clients"]) for k in range(2)]
    assert counts == [labels.count(0), labels.count(1)]  # the federation's prior: every training label
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(sim.rows) == 2
    for got, expected in zip(rows, sim.rows):
        for key in ("round", "clients", "ranks", "accuracy", "f1", "uplink_bytes", "downlink_bytes",
                    "rejected"):
            assert got[key] == expected[key], key
        for key in ("eval_loss", "train_loss"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    strategy = get_strategy("hlora")
    mine, _ = load_checkpoint(out)
    theirs, _ = load_checkpoint(sim.out)
    assert "server_opt" in mine.extra and "server_opt" in theirs.extra  # the momentum was kept
    assert_same_adapter(strategy.global_adapter(mine), strategy.global_adapter(theirs), 1e-5, 1e-6)
    for name, t in theirs.head.items():
        torch.testing.assert_close(mine.head[name], t, rtol=1e-5, atol=1e-6)


def instruct_data(tiny_decoder) -> dict[str, Any]:  # noqa: F811
    """The tiny Llama and its synthetic instruction set (tests/test_instruct.py) as run-config keys."""
    model, train, dev = tiny_decoder
    return {"task": "instruct", "train": train, "dev": dev, "model": model,
            "target-modules": "q_proj,k_proj,v_proj,o_proj", "max-length": 64, "gen-samples": 2,
            "max-new-tokens": 6}


def test_instruction_tuning_of_a_decoder_lm_equals_the_simulation(tmp_path, tiny_model, tiny_mrpc,
                                                                  tiny_decoder):  # noqa: F811
    """--task instruct: the tiny Llama, 3 nodes holding partition ids 0..2 of the training JSONL (ranks 2, 4,
    8), 2 rounds: the nodes train on their responses (no labels, no logit adjustment: the app's default 1.0
    is not applied, as in hlora run), the server scores eval loss, perplexity and ROUGE-L on its dev file;
    the rows and the final adapter are the simulation's, and the adapter is a causal LM's."""
    out, sim = flower_and_simulation(tmp_path, tiny_model, tiny_mrpc, data=instruct_data(tiny_decoder),
                                     **{"lr": 1e-2, "logit-adjust": 1.0})
    flower = json.loads((out / "flower.json").read_text())
    assert [(c["partition_id"], c["rank"], c["label_counts"]) for c in flower["clients"]] == \
        [(i, r, None) for i, r in enumerate(RANKS)]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(sim.rows) == 2
    for got, expected in zip(rows, sim.rows):
        assert "accuracy" not in got and not got["rejected"]
        for key in ("round", "clients", "ranks", "uplink_bytes", "downlink_bytes", "rejected"):
            assert got[key] == expected[key], key
        for key in ("eval_loss", "perplexity", "train_loss", "rouge_l"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    assert rows[1]["eval_loss"] < rows[0]["eval_loss"]  # it learns
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_eval_loss"] == rows[-1]["eval_loss"] and summary["final_rouge_l"] == rows[-1]["rouge_l"]
    assert not (out / "dev_predictions.json").exists()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    strategy = get_strategy("hlora")
    mine, _ = load_checkpoint(out)
    theirs, _ = load_checkpoint(sim.out)
    assert not mine.head and not theirs.head
    assert_same_adapter(strategy.global_adapter(mine), strategy.global_adapter(theirs), 1e-5, 1e-6)


def simulated(tmp_path: Path, tiny_model, tiny_mrpc, rounds: int, per_round: int, **options) -> list[dict]:
    """The rows of ``hlora run`` with the settings of :func:`run_config` (clients 0, 1, 2 of ranks 2, 4, 8)."""
    train, dev = tiny_mrpc
    cfg = load_config(None, {
        "task": "mrpc", "train": train, "dev": dev, "text_columns": TEXT, "label_column": "Quality",
        "model": tiny_model, "max_length": 48, "clients": 3, "per_round": per_round, "rounds": rounds,
        "local_epochs": 1, "batch_size": 8, "partition": "iid", "ranks": ",".join(map(str, RANKS)), "threads": 1,
        "out": str(tmp_path / "simulation"),
        **{k.replace("-", "_"): v for k, v in {**PINNED, **options}.items()},
    })
    threads = torch.get_num_threads()
    try:
        return simulation.run(cfg).rows
    finally:
        torch.set_num_threads(threads)


def assert_same_rows(got: list[dict], expected: list[dict]) -> None:
    """Round by round, the metrics that do not measure time (losses to float tolerance)."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        for key in ("round", "clients", "ranks", "accuracy", "f1", "uplink_bytes", "downlink_bytes", "rejected"):
            assert a[key] == b[key], (a["round"], key)
        for key in ("eval_loss", "train_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["round"], key)


def test_a_run_resumed_after_a_superlink_crash_gives_the_uninterrupted_metrics(tmp_path, tiny_model, tiny_mrpc):
    """4 rounds of 2 of the 3 nodes (the sampler's state matters), server momentum and a cosine lr (the
    checkpoint's state matters). The SuperLink's machine dies after round 2 (SuperLink, SuperExec and
    ServerApp SIGKILLed; the SuperNodes stay up); a new SuperLink on the same database, then ``flwr run
    --run-config 'resume="OUT"'`` alone: the resumed run's rows are those of the run that was never
    interrupted (``hlora run``, which the Flower run equals client for client, as the test above shows)."""
    options = {"server-opt": "avgm", "server-momentum": 0.9, "lr-schedule": "cosine"}
    sites = {r: f"rank={r} partition-id={i} num-partitions=3 threads=1" for i, r in enumerate(RANKS)}
    cluster = Cluster(tmp_path / "flower", database=True)
    out = tmp_path / "flower-run"
    try:
        start(cluster, sites)
        first = cluster.run(run_config(tiny_model, tiny_mrpc, out, rounds=4, **{"per-round": 2,
                                                                                "save-updates": False}, **options))
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert time.monotonic() < deadline, f"round 2 never ended; logs in {cluster.root}"
            time.sleep(0.1)
        cluster.crash_superlink()
        done = len(metrics.read_text().splitlines())
        assert 2 <= done < 4 and not (out / "summary.json").exists()
        cluster.start_superlink()
        resumed = cluster.run(f'resume="{out}"', wait=60)
        assert resumed != first
        run = cluster.wait(resumed, timeout=300)
        assert run["status"] == "finished:completed", run
        again = cluster.wait(cluster.run(f'resume="{out}"'), timeout=120)
        assert again["status"] == "finished:failed" and "already finished" in again["status-details"]
    finally:
        left = cluster.close()
    assert not left, f"processes left running: {left}"

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert_same_rows(rows, simulated(tmp_path, tiny_model, tiny_mrpc, rounds=4, per_round=2, **options))
    assert len({tuple(r["clients"]) for r in rows}) > 1  # the sampler's draws differ: its state was restored
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 4 and summary["final_accuracy"] == rows[-1]["accuracy"]
    flower = json.loads((out / "flower.json").read_text())
    assert [(c["partition_id"], c["rank"]) for c in flower["clients"]] == list(enumerate(RANKS))
    assert flower["run_config"]["rounds"] == 4 and flower["run_config"]["model"] == tiny_model


def test_clients_score_the_global_model_on_the_share_they_hold_out(cluster, tiny_model, tiny_mrpc, sites, tmp_path):
    """evaluate-on both: after each round the server scores the global model on its dev set, and each node on
    the seeded quarter of its data it holds out (it trains on the rest); the row records each node's score and
    their average weighted by examples, which equal the in-process evaluation of the checkpoint's model."""
    from hlora.engine.flower.settings import held_out
    from hlora.metrics import evaluate

    out = tmp_path / "run"
    config = run_config(tiny_model, tiny_mrpc, out, **{"evaluate-on": "both", "client-eval-fraction": 0.25,
                                                       "save-updates": False})
    run = cluster.wait(cluster.run(config), timeout=300)
    assert run["status"] == "finished:completed", run

    task = load_task("mrpc", *tiny_mrpc, TEXT, "Quality")
    shares = partition(task.train.labels, 3, "iid", 0.5, 0)
    parts = {rank: held_out(task.train.subset(shares[i]), 0.25, 0, -1 if rank == 8 else i)
             for i, rank in enumerate(RANKS)}  # the rank-8 node reads the same share from its own file
    flower = json.loads((out / "flower.json").read_text())
    node_rank = {c["node_id"]: c["rank"] for c in flower["clients"]}
    assert {c["rank"]: c["num_examples"] for c in flower["clients"]} == {r: len(p[0]) for r, p in parts.items()}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert 0 <= row["accuracy"] <= 1 and "client_eval_failed" not in row
        evals = row["client_eval"]
        assert sorted(e["node"] for e in evals) == sorted(node_rank)
        assert all(e["examples"] == len(parts[node_rank[e["node"]]][1]) for e in evals)
        n = sum(e["examples"] for e in evals)
        assert row["client_accuracy"] == pytest.approx(sum(e["accuracy"] * e["examples"] for e in evals) / n)
        assert row["client_eval_loss"] == pytest.approx(sum(e["eval_loss"] * e["examples"] for e in evals) / n)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_client_accuracy"] == rows[-1]["client_accuracy"]
    assert summary["final_accuracy"] == rows[-1]["accuracy"]

    state, _ = load_checkpoint(out)  # the last round's global model, which the nodes scored
    model, tok = load_classifier(tiny_model, 2, 0)
    fm = FederatedModel(model)
    adapter = get_strategy("hlora").global_adapter(state)
    for e in rows[-1]["client_eval"]:
        expected = evaluate(fm, adapter, state.head, encode(tok, parts[node_rank[e["node"]]][1], 48), 128,
                            task.f1_label)
        assert e["accuracy"] == pytest.approx(expected["accuracy"]), e
        assert e["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-4, abs=1e-6), e


def test_a_node_that_connects_after_round_1_is_sampled_from_the_next_round_on(tmp_path, tiny_model, tiny_mrpc):
    """2 nodes (ranks 2 and 8) start the run; once round 1 has begun, a rank-4 node connects, and a rank-16
    node (above the shared initialisation's rank 8). The rank-4 node becomes client 2 at the next round's
    start and the seeded sampler draws from 3 clients from then on; the rank-16 node is left out, with its
    reason in flower.json."""
    sites = {2: "rank=2 partition-id=0 num-partitions=3 threads=1", 8: "rank=8 partition-id=2 num-partitions=3 threads=1"}
    cluster = Cluster(tmp_path / "flower")
    out = tmp_path / "run"
    try:
        start(cluster, sites)
        run_id = cluster.run(run_config(tiny_model, tiny_mrpc, out, rounds=4, seed=3,
                                        **{"clients": 2, "per-round": 2, "save-updates": False}))
        deadline = time.monotonic() + 120
        while not (out / "flower.json").exists():  # the 2 nodes answered: round 1 begins
            assert time.monotonic() < deadline, f"the run never started; logs in {cluster.root}"
            time.sleep(0.1)
        assert not (out / "metrics.jsonl").exists()
        cluster.start_node("late4", "rank=4 partition-id=1 num-partitions=3 threads=1")
        cluster.start_node("late16", "rank=16 partition-id=1 num-partitions=3 threads=1")
        run = cluster.wait(run_id, timeout=400)
        assert run["status"] == "finished:completed", run
    finally:
        left = cluster.close()
    assert not left, f"processes left running: {left}"

    flower = json.loads((out / "flower.json").read_text())
    assert [(c["client"], c["rank"], c["partition_id"]) for c in flower["clients"]] == [(0, 2, 0), (1, 8, 2), (2, 4, 1)]
    joined = flower["clients"][2]["joined"]
    assert [c["joined"] for c in flower["clients"][:2]] == [1, 1] and joined in (2, 3), joined
    [refused] = flower["left_out"]
    assert "rank 16 is above the run's largest rank 8" in refused["reason"]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["clients"] == 3 and cfg["client_ranks"] == [2, 8, 4]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sampler = np.random.default_rng([3, 2])  # the server's: from the clients there are at each round's start
    expected = [sorted(sampler.choice(2 if rnd < joined else 3, 2, replace=False).tolist()) for rnd in range(1, 5)]
    assert [r["clients"] for r in rows] == expected
    assert any(2 in r["clients"] for r in rows[joined - 1:])  # seed 3 samples it at once
    late_node = flower["clients"][2]["node_id"]
    for r in rows:
        assert not r["rejected"] and not r["skipped"] and sorted(r["client_train_loss"]) == [str(c) for c in r["clients"]]
        assert r["ranks"] == [[2, 8, 4][c] for c in r["clients"]]
        assert (late_node in r["nodes"]) == (2 in r["clients"])


def test_node_workers_keep_the_model_loaded_and_the_run_equals_the_simulation(tmp_path, tiny_model, tiny_mrpc):
    """node-config ``worker=true`` on every node: each node's first ClientApp process starts a worker that
    loads the model and data once and serves the node's query and both rounds' train messages (one pid per
    node), except one node whose worker is SIGKILLed between the rounds: its round-2 message starts a new
    worker. The run gives the simulation's rows and final model (as the nodes without workers of the TLS test do, above). Dropout
    and logit adjustment are on, so a worker that kept its RNG or objective between rounds would differ. The
    workers exit when their SuperNodes stop, and none is left."""
    workers = tmp_path / "w"
    killed: list[Path] = []

    def kill_a_worker_between_the_rounds(out: Path) -> None:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not killed:  # round 1 is over; a worker that has not begun round 2 (the nodes poll every few s)
            assert time.monotonic() < deadline, "round 1 never ended"
            if metrics.exists() and metrics.read_text().strip():
                for log in sorted(workers.glob("*.log")):
                    last = log.read_text().strip().splitlines()[-1]
                    if "served train (message 2)" in last:
                        os.kill(int(re.search(r"node worker (\d+):", last).group(1)), signal.SIGKILL)
                        killed.append(log)
                        break
            time.sleep(0.02)

    options = {"logit-adjust": 1.0, "local-steps": 2, "dropout": 0.1, "lr-schedule": "cosine"}
    out, sim = flower_and_simulation(tmp_path, tiny_model, tiny_mrpc, node_config=f'worker=true worker-dir="{workers}"',
                                     during=kill_a_worker_between_the_rounds, **options)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert_same_rows(rows, sim.rows)
    assert all(not r["rejected"] for r in rows)
    strategy = get_strategy("hlora")
    mine, _ = load_checkpoint(out)
    theirs, _ = load_checkpoint(sim.out)
    assert_same_adapter(strategy.global_adapter(mine), strategy.global_adapter(theirs), 1e-5, 1e-6)
    for name, t in theirs.head.items():
        torch.testing.assert_close(mine.head[name], t, rtol=1e-5, atol=1e-6)

    logs = sorted(workers.glob("*.log"))
    assert len(logs) == 3 and len(killed) == 1, logs  # one log per node (a node's workers share it)
    for log in logs:
        text = log.read_text()
        served = re.findall(r"node worker (\d+): serving (\w+) \(message (\d+)\)", text)
        pids = [pid for pid, _, _ in served]
        if log in killed:  # the new worker loaded the site again and served round 2
            assert [(kind, n) for _, kind, n in served] == [("query", "1"), ("train", "2"), ("train", "1")], text
            assert pids[0] == pids[1] != pids[2], text
        else:
            assert [(kind, n) for _, kind, n in served] == [("query", "1"), ("train", "2"), ("train", "3")], text
            assert len(set(pids)) == 1, text  # the same process for every message
        assert "that it watches is gone" in text, text  # it exited with its SuperNode
    assert not list(workers.glob("*.sock")) and not list(workers.glob("*.key"))  # removed at exit


def test_fedsa_nodes_keep_their_B_and_score_their_own_models_as_the_simulation_does(tmp_path, tiny_model,
                                                                                    tiny_mrpc):
    """strategy fedsa, 3 partition-id nodes (ranks 2, 4, 8) with node workers (the default; the per-message
    path and a worker killed between rounds: tests/test_node_worker.py), 3 rounds of 2 (seed 0 samples
    [0, 1], [0, 2], [0, 1]: client 0 trains from its kept B twice, client 2 is scored with B = 0 after round 1).
    Each node holds out hlora run's share of its examples, keeps its B and head in its run state, and scores its
    own model: the rows' personal scores, bytes (A only) and losses are the simulation's, the server's A is the
    simulation's, and the server reports no accuracy of its own (it holds B = 0) and writes no adapter."""
    options = {"strategy": "fedsa", "rounds": 3, "per-round": 2, "head-opt": "sgd", "head-lr": 0.1}
    out, sim = flower_and_simulation(tmp_path, tiny_model, tiny_mrpc,
                                     **options)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in rows] == [r["clients"] for r in sim.rows] == [[0, 1], [0, 2], [0, 1]]
    for got, expected in zip(rows, sim.rows, strict=True):
        assert "accuracy" not in got and "energy_kept" not in got and "personal_eval_failed" not in got
        for key in ("round", "clients", "ranks", "uplink_bytes", "downlink_bytes", "rejected", "personal_examples",
                    "client_personal_accuracy", "personal_accuracy"):
            assert got[key] == expected[key], (got["round"], key)
        assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5, abs=1e-7)
        assert got["client_train_loss"] == pytest.approx(expected["client_train_loss"], rel=1e-5, abs=1e-7)
    assert set(rows[0]["client_personal_accuracy"]) == {"0", "1", "2"}  # the never-trained client 2 too
    # only A travels: tiny BERT, 2 layers x (query, value), k = 32, float32
    assert rows[0]["uplink_bytes"] == sum(4 * r * 32 * 4 for r in rows[0]["ranks"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_personal_accuracy"] == rows[-1]["personal_accuracy"] and "final_accuracy" not in summary
    assert not (out / "adapter").exists() and not (out / "dev_predictions.json").exists()
    mine, saved = load_checkpoint(out)
    theirs, _ = load_checkpoint(sim.out)
    assert "client_states" not in saved  # the clients' B are on their nodes
    for m, g in mine.lora.items():
        assert torch.equal(g.B, torch.zeros_like(g.B))
        torch.testing.assert_close(g.A, theirs.lora[m].A, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="holds no model of theirs"):  # hlora eval/export/predict: one line
        load_run(out)


def test_a_node_killed_mid_round_is_recorded_and_the_round_completes(cluster, tiny_model, tiny_mrpc,
                                                                       tmp_path):
    """Last in this file: it kills a node of the module's cluster, which later tests of that cluster need."""
    out = tmp_path / "run"
    victim = "rank8"
    run_id = cluster.run(run_config(tiny_model, tiny_mrpc, out, rounds=1, **{"min-clients": 2,
                                                                             "round-timeout": 30.0}))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # round 1 has begun and the victim is training
        training = any("flwr-clientapp" in cmd for _, cmd in cluster.descendants(victim))
        if (out / "flower.json").exists() and training:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the victim never started training; logs in {cluster.root}")
    cluster.kill(victim)
    gone = time.monotonic() + 10
    while cluster.descendants(victim) and time.monotonic() < gone:
        time.sleep(0.1)
    assert not cluster.descendants(victim)
    run = cluster.wait(run_id, timeout=240)
    assert run["status"] == "finished:completed", run
    flower = json.loads((out / "flower.json").read_text())
    dead = next(c for c in flower["clients"] if c["rank"] == 8)
    [row] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not row["skipped"] and row["clients"] == [0, 1, 2]
    assert [(r["client"], r["node_id"]) for r in row["rejected"]] == [(dead["client"], dead["node_id"])]
    reason = row["rejected"][0]["reason"]  # our deadline, or the SuperLink's missed-heartbeat notice
    assert "NodeUnavailable" in reason and ("no reply within 30 s" in reason or "Node Unavailable" in reason)
    saved = torch.load(out / "updates" / "round-1.pt", weights_only=False)
    assert sorted(u.client for u in saved["updates"]) == sorted({0, 1, 2} - {dead["client"]})
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "summary.json").exists()
