"""End-to-end runs of the embedded simulation on a tiny model (and one on the real MiniLM)."""

import json

import pytest
import torch
import yaml

from hlora import load_config, run
from hlora.model import FederatedModel, load_classifier
from tests.test_cli import run_cli


def tiny_config(tiny_args, out, **extra):
    keys = tiny_args[0::2]
    values = tiny_args[1::2]
    overrides = {k.lstrip("-").replace("-", "_"): v for k, v in zip(keys, values)}
    for k in ("clients", "per_round", "rounds", "local_epochs", "batch_size", "max_length"):
        overrides[k] = int(overrides[k])
    overrides.update(out=str(out), **extra)
    return load_config(None, overrides)


def test_two_round_four_client_run_writes_every_output(tiny_args, tmp_path, capsys):
    out = tmp_path / "run"
    code = None
    import sys

    from hlora import cli

    sys.argv = ["hlora", "run", *tiny_args, "--out", str(out)]
    try:
        cli.main()
    except SystemExit as e:  # typer exits 0 at the end
        code = e.code
    assert code in (None, 0)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["strategy"] == "hlora" and len(cfg["client_ranks"]) == 4
    assert all(2 <= r <= 4 for r in cfg["client_ranks"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("accuracy", "f1", "eval_loss", "train_loss", "clients", "uplink_bytes", "downlink_bytes",
                    "seconds"):
            assert key in r
        assert len(r["clients"]) == 2 and len(set(r["clients"])) == 2
        assert 0.0 <= r["accuracy"] <= 1.0 and r["uplink_bytes"] > 0 and r["downlink_bytes"] > 0
        kept = [r["energy_kept"][str(k)] for k in sorted(set(cfg["client_ranks"]))]
        assert all(0.0 < e <= 1.0 for e in kept) and kept == sorted(kept)  # more rank, more energy
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final_accuracy"] == rows[-1]["accuracy"]
    assert summary["uplink_bytes"] == sum(r["uplink_bytes"] for r in rows)
    assert summary["provenance"]["torch"] == torch.__version__ and summary["provenance"]["hlora"]
    text = capsys.readouterr().err
    assert "round   1/2" in text and "round   2/2" in text


def test_uplink_bytes_are_exactly_the_factors_and_head_sent(tiny_args, tmp_path):
    res = run(tiny_config(tiny_args, tmp_path / "r", ranks="3"))
    # tiny BERT: 2 layers x (query, value), each 32 x 32; rank 3; head 2 x 32 + 2; float32
    per_client = (2 * 2 * 3 * (32 + 32) + 2 * 32 + 2) * 4
    assert res.rows[0]["uplink_bytes"] == 2 * per_client == res.rows[0]["downlink_bytes"]


def test_same_config_same_metrics(tiny_args, tmp_path):
    a = run(tiny_config(tiny_args, tmp_path / "a"))
    b = run(tiny_config(tiny_args, tmp_path / "b"))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]
    assert strip(a.rows) == strip(b.rows)
    c = run(tiny_config(tiny_args, tmp_path / "c", seed=1))
    assert strip(c.rows) != strip(a.rows)


def test_centralized_pools_the_rounds_clients(tiny_args, tmp_path):
    res = run(tiny_config(tiny_args, tmp_path / "c", strategy="centralized"))
    assert res.rows[0]["uplink_bytes"] == 0 and res.rows[0]["downlink_bytes"] == 0
    assert len(res.rows) == 2


def test_centralized_takes_the_rounds_total_of_local_steps(tiny_args, tmp_path, monkeypatch):
    """With --local-steps N the pooled site takes N x (clients a round) steps, as the federated round does."""
    from hlora.engine import simulation

    seen, real = [], simulation.train_client

    def spy(*args, **kwargs):  # the real training, recording the steps it was asked for
        seen.append((kwargs["client_id"], kwargs["local_steps"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(simulation, "train_client", spy)
    cfg = tiny_config(tiny_args, tmp_path / "c", strategy="centralized", local_steps=3, rounds=1)
    run(cfg)
    assert seen == [(-1, 3 * cfg.per_round)]
    seen.clear()
    run(tiny_config(tiny_args, tmp_path / "h", strategy="hlora", local_steps=3, rounds=1))
    assert [steps for _, steps in seen] == [3] * cfg.per_round


def test_an_existing_run_is_never_overwritten(tiny_args, tmp_path, capsys):
    run(tiny_config(tiny_args, tmp_path / "r", rounds=1))
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    code, text = run_cli(["run", *tiny_args, "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "already holds a run" in text
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


def test_one_base_model_swaps_adapters_without_copying_weights(tiny_model):
    model, _ = load_classifier(tiny_model, 2, seed=0)
    fm = FederatedModel(model)
    base = {n: p.data_ptr() for n, p in model.named_parameters() if "classifier" not in n}
    n_params = sum(p.numel() for p in model.parameters())
    from hlora.factors import init_factors

    for r in (2, 8, 4):
        lora = init_factors(fm.shapes, r, torch.Generator().manual_seed(r))
        params = fm.install(lora, fm.head_state())
        assert sum(p.numel() for p in params) == 4 * r * 64 + 66  # only the adapter and head train
        fm.read()
        fm.clear()
    assert {n: p.data_ptr() for n, p in model.named_parameters() if "classifier" not in n} == base
    assert sum(p.numel() for p in model.parameters()) == n_params  # no adapter left behind


def test_frozen_branch_and_frozen_A(tiny_model):
    """A frozen low-rank branch changes the function but does not train; train_A=False freezes A."""
    model, tok = load_classifier(tiny_model, 2, seed=0)
    fm = FederatedModel(model)
    from hlora.factors import Factor

    g = torch.Generator().manual_seed(0)
    lora = {m: Factor(torch.randn(d, 2, generator=g), torch.randn(2, k, generator=g), 1.0)
            for m, (d, k) in fm.shapes.items()}
    x = tok(["a test sentence"], return_tensors="pt")
    fm.model.eval()
    fm.install({}, fm.head_state(), frozen=lora)
    with torch.no_grad():
        y_frozen = fm.model(**x).logits
    fm.clear()
    params = fm.install(lora, fm.head_state(), train_A=False)
    with torch.no_grad():
        y_lora = fm.model(**x).logits
    ids = {id(p) for p in params}
    assert all(id(layer.lora_B) in ids and id(layer.lora_A) not in ids for layer in fm.layers.values())
    assert len(params) == len(fm.layers) + len(fm.head_params)
    fm.clear()
    torch.testing.assert_close(y_frozen, y_lora)


def test_real_minilm_end_to_end_on_a_few_dozen_examples(tiny_mrpc, tmp_path):
    train, dev = tiny_mrpc
    cfg = load_config(None, dict(
        train=train, dev=dev, task="mrpc", text_columns=["#1 String", "#2 String"], label_column="Quality",
        clients=3, per_round=2, rounds=2, local_epochs=1, batch_size=8, max_length=64, ranks="2,8",
        out=str(tmp_path / "mini"),
    ))
    res = run(cfg)
    assert len(res.rows) == 2 and res.summary["strategy"] == "hlora"
    # MiniLM query/value are 384 x 384: rank 2 and 8 clients upload 12 modules of r * 768 floats each
    assert res.rows[0]["uplink_bytes"] > 12 * 2 * 768 * 4


@pytest.mark.parametrize("name", ["hlora", "flexlora", "fedit", "hetlora", "ffa", "fedplora", "flora",
                                  "centralized", "fedex", "rolora", "lorafair"])
def test_every_strategy_runs_end_to_end(name, tiny_args, tmp_path):
    extra = {"ranks": "4"} if name == "fedit" else {}
    res = run(tiny_config(tiny_args, tmp_path / name, strategy=name, **extra))
    assert [r["round"] for r in res.rows] == [1, 2]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["train_loss"] > 0 for r in res.rows)


def test_strategy_options_reach_the_strategy(tiny_args, tmp_path, capsys):
    res = run(tiny_config(tiny_args, tmp_path / "h", strategy="hetlora", strategy_options=["norm_weights=true"]))
    assert yaml.safe_load((res.out / "config.yaml").read_text())["strategy_options"] == {"norm_weights": True}
    code, text = run_cli(["run", *tiny_args, "--strategy", "hlora", "--strategy-option", "bogus=1",
                          "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "does not take the option(s) bogus" in text


def test_hetlora_self_pruning_runs_and_prunes(tiny_args, tmp_path):
    from hlora.checkpoint import load_checkpoint

    res = run(tiny_config(tiny_args, tmp_path / "p", strategy="hetlora", rounds=3, per_round=4,
                          strategy_options=["prune=true", "prune_decay=1.0", "prune_threshold=10"]))
    state, _ = load_checkpoint(res.out)
    pruned = state.extra["pruned"]
    assert pruned and all(r >= 1 for r in pruned.values())
    ranks = yaml.safe_load((res.out / "config.yaml").read_text())["client_ranks"]
    assert all(pruned[c] < ranks[c] for c in pruned)


def test_a_run_on_a_bundled_sst2_subset(tiny_model, tmp_path, capsys):
    """``--task sst2 --train-subset N``: single sentences, N training examples split over the clients, the
    whole 872-sentence dev set scored, and the subset recorded in config.yaml so the run can be repeated."""
    out = tmp_path / "sst2"
    code, text = run_cli(["run", "--model", tiny_model, "--task", "sst2", "--train-subset", "40", "--clients", "4",
                          "--per-round", "2", "--rounds", "1", "--local-epochs", "1", "--batch-size", "8",
                          "--max-length", "32", "--ranks", "2", "--precision", "fp32", "--out", str(out)], capsys)
    assert code in (None, 0), text
    assert yaml.safe_load((out / "config.yaml").read_text())["train_subset"] == 40
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["round"] == 1 and 0 <= row["accuracy"] <= 1
    assert len(json.loads((out / "dev_predictions.json").read_text())["predicted"]) == 872
