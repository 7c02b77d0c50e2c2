"""Rank policies (--rank-policy, --rank-file) and per-layer ranks (--layer-ranks)."""

import json

import pytest
import torch
import yaml

from hlora.config import ConfigError, RunConfig, load_config
from hlora.factors import Factor, init_factors
from hlora.ranks import (
    check_patterns,
    client_ranks,
    data_ranks,
    module_ranks,
    parse_layer_ranks,
    read_rank_file,
)
from hlora.strategies import ClientSpec, StrategyError, Update, get_strategy, names
from tests.test_strategies import local_update

# draw_ranks' values before rank policies existed (commit df658a9): runs and results depend on them
BEFORE = {("2-8", 12, 0): [5, 8, 8, 5, 4, 7, 3, 8, 8, 2, 2, 3], ("2-8", 12, 3): [8, 3, 6, 4, 7, 4, 3, 4, 7, 5, 5, 8],
          ("2,4,8", 7, 0): [2, 4, 8, 2, 4, 8, 2]}


@pytest.mark.parametrize("key", list(BEFORE))
@pytest.mark.parametrize("policy", [None, "given"])
def test_uniform_and_list_assign_exactly_the_ranks_of_before(key, policy):
    spec, clients, seed = key
    named = None if policy is None else ("uniform" if "-" in spec else "list")
    cfg = load_config(None, {"ranks": spec, "clients": clients, "per_round": 1, "seed": seed,
                             "rank_policy": named})
    assert client_ranks(cfg) == (BEFORE[key], [])
    # the data sizes change nothing for them
    assert client_ranks(cfg, list(range(1, clients + 1))) == (BEFORE[key], [])


def test_data_ranks_grow_with_the_clients_examples():
    g = torch.Generator().manual_seed(0)
    sizes = [int(x) for x in torch.randint(1, 500, (60,), generator=g)]
    ranks = data_ranks(2, 8, sizes)
    order = sorted(range(len(sizes)), key=lambda k: sizes[k])
    assert [ranks[k] for k in order] == sorted(ranks)  # monotone in the size
    assert ranks[order[-1]] == 8 and ranks[order[0]] == 2 and set(ranks) <= set(range(2, 9))
    assert data_ranks(2, 8, [40] * 5) == [8] * 5  # no size information: every client at HIGH
    assert data_ranks(2, 8, [36, 37, 36]) == [8, 8, 8]  # an IID split's sizes are not spread over 2..8
    assert data_ranks(2, 8, [10, 20, 40, 80]) == [2, 4, 6, 8]  # linear in log n
    assert data_ranks(2, 8, [10, 20]) == [2, 8]  # a factor of 2 spans LOW..HIGH
    cfg = load_config(None, {"ranks": "2-8", "clients": 4, "per_round": 1, "rank_policy": "data"})
    assert client_ranks(cfg, [10, 80, 20, 40]) == ([2, 8, 4, 6], [])


def write(path, text):
    path.write_text(text)
    return str(path)


def test_rank_file_is_read(tmp_path):
    f = write(tmp_path / "r.csv", "client,rank\n2,4\n0,8\n1,2\n")
    assert read_rank_file(f, 3) == [8, 2, 4]
    cfg = load_config(None, {"clients": 3, "per_round": 1, "rank_file": f})  # --rank-file implies the policy
    assert client_ranks(cfg) == ([8, 2, 4], [])
    assert read_rank_file(write(tmp_path / "n.csv", "0,3\n1,5\n"), 2) == [3, 5]  # no header


@pytest.mark.parametrize("text,message", [
    ("client,rank\n0,8\n2,4\n", "no rank for client 1"),
    ("0,8\n1,x\n2,4\n", ":2: the rank must be an integer, got 'x'"),
    ("0,8\n1,2.5\n2,4\n", "the rank must be an integer"),
    ("0,8\n1,0\n2,4\n", "client 1's rank must be at least 1, got 0"),
    ("0,8\n1,2\n1,4\n", "client 1 is given twice"),
    ("0,8\n1,2\n3,4\n", "client 3 is not one of 0..2"),
    ("0,8,1\n", "expected two columns"),
])
def test_bad_rank_files_fail_with_one_line(tmp_path, text, message):
    f = write(tmp_path / "r.csv", text)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")) as e:
        load_config(None, {"clients": 3, "per_round": 1, "rank_policy": "file", "rank_file": f})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("opts,message", [
    ({"rank_policy": "best"}, "--rank-policy must be one of uniform, list, data, file"),
    ({"rank_policy": "list", "ranks": "2-8"}, "--rank-policy list takes N,M,..."),
    ({"rank_policy": "uniform", "ranks": "2,4"}, "--rank-policy uniform takes LOW-HIGH"),
    ({"rank_policy": "data", "ranks": "2,4"}, "--rank-policy data takes LOW-HIGH"),
    ({"rank_policy": "file"}, "--rank-policy file needs --rank-file"),
    ({"rank_policy": "uniform", "rank_file": "x.csv"}, "--rank-file gives the ranks of --rank-policy file"),
    ({"rank_file": "missing.csv"}, "no such file"),
    ({"layer_ranks": "query"}, "--layer-ranks takes PATTERN:SPEC"),
    ({"layer_ranks": "query:x"}, "--layer-ranks query: --ranks takes"),
    ({"layer_ranks": "query:0"}, "a LoRA rank must be at least 1"),
    ({"layer_ranks": "query:2,query:4"}, "names 'query' twice"),
    ({"layer_ranks": "query:2-4", "rank_policy": "list", "ranks": "8"}, "--rank-policy list takes N,M"),
])
def test_rank_options_are_refused_with_one_line(opts, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("-", r"\-")) as e:
        load_config(None, {"clients": 4, "per_round": 1, **opts})
    assert "\n" not in str(e.value)


def test_layer_ranks_parse_from_the_cli_and_a_config_file(tmp_path):
    assert parse_layer_ranks("query:2-4,value:8") == {"query": "2-4", "value": "8"}
    assert parse_layer_ranks("query:2,4,8, value : 3") == {"query": "2,4,8", "value": "3"}
    assert parse_layer_ranks({"attention.self.value": 8}) == {"attention.self.value": "8"}
    assert parse_layer_ranks("") == {} and parse_layer_ranks(None) == {}
    path = tmp_path / "c.yaml"
    path.write_text("clients: 4\nper_round: 1\nlayer_ranks:\n  query: 2-4\n  value: 8\n")
    cfg = load_config(path, {})
    assert cfg.layer_ranks == {"query": "2-4", "value": "8"}
    ranks, layers = client_ranks(cfg)
    assert [set(layer) for layer in layers] == [{"query", "value"}] * 4
    assert all(2 <= layer["query"] <= 4 and layer["value"] == 8 for layer in layers)
    assert ranks == client_ranks(load_config(None, {"clients": 4, "per_round": 1}))[0]  # --ranks as before
    # each pattern draws from its own stream: seeded, and not the --ranks draw
    again = load_config(None, {"clients": 50, "per_round": 1, "layer_ranks": "query:2-8"})
    assert client_ranks(again) == client_ranks(again)
    assert [x["query"] for x in client_ranks(again)[1]] != client_ranks(again)[0]


def test_layer_patterns_match_module_names_like_target_modules():
    modules = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]
    check_patterns(modules, ["query", "1.attention.self.value"])
    got = module_ranks(modules, 5, {"query": 2, "1.attention.self.value": 8})
    assert list(got.values()) == [2, 5, 2, 8]
    with pytest.raises(ConfigError, match="--layer-ranks key: no adapted layer matches; they are: query, value"):
        check_patterns(modules, ["key"])
    with pytest.raises(ConfigError, match="matches both 'value' and 'self.value'"):
        check_patterns(modules, ["value", "self.value"])
    with pytest.raises(ConfigError, match="no adapted layer matches"):  # a suffix of a dotted part is no match
        check_patterns(modules, ["alue"])


def test_an_old_config_without_the_new_keys_loads(tmp_path):
    old = {k: v for k, v in RunConfig(clients=4, per_round=2).to_dict().items()
           if k not in ("rank_policy", "rank_file", "layer_ranks", "client_layer_ranks")}
    old["client_ranks"] = [5, 8, 8, 5]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    cfg = load_config(path, {})
    assert (cfg.rank_policy, cfg.layer_ranks, cfg.client_layer_ranks) == (None, None, [])
    assert client_ranks(cfg)[0] == cfg.client_ranks


# -- the strategies with per-module ranks -------------------------------------------------------------

SHAPES = {"q": (20, 16), "v": (12, 18)}


def per_module_init(rank=8):
    init = init_factors(SHAPES, rank, torch.Generator().manual_seed(0))
    return {m: Factor(f.B.double(), f.A.double(), 1.0) for m, f in init.items()}


MIXED = [ClientSpec(0, {"q": 2, "v": 6}, 16.0, 10), ClientSpec(1, {"q": 5, "v": 1}, 16.0, 30),
         ClientSpec(2, {"q": 8, "v": 3}, 8.0, 20)]


@pytest.mark.parametrize("name", [n for n in names() if n != "fedit"])
def test_every_strategy_gives_each_module_its_own_rank(name):
    s = get_strategy(name)
    specs = MIXED[2:] if s.pools_clients else MIXED  # centralized: one pooled site
    s.check(specs)
    state = s.init_state(per_module_init(), {"h": torch.zeros(3, dtype=torch.float64)})
    for rnd in range(2):
        updates = []
        for c in specs:
            payload = s.dispatch(state, c, torch.Generator().manual_seed(rnd * 10 + c.id))
            for m, f in payload.lora.items():
                assert f.rank == c.ranks[m], (m, f.rank, c.ranks[m])
                assert f.B.shape == (SHAPES[m][0], c.ranks[m]) and f.A.shape == (c.ranks[m], SHAPES[m][1])
                assert f.scale == pytest.approx(c.alpha / c.ranks[m])
            updates.append(local_update(payload, c, rnd))
        state = s.aggregate(state, updates)
        for m, f in s.global_adapter(state).items():
            assert f.delta().shape == SHAPES[m] and torch.isfinite(f.delta()).all()


def test_fedit_refuses_ranks_that_differ_between_modules():
    with pytest.raises(StrategyError, match="equal ranks only"):
        get_strategy("fedit").check([ClientSpec(0, {"q": 4, "v": 8}, 16.0, 1)])


def test_hlora_with_per_layer_ranks_against_the_dense_reference():
    """Per module m: dW_m = sum_k p_k s_k^m B_k^m A_k^m, and client k receives the best rank-r_k^m
    approximation of dW_m at its scaling alpha / r_k^m."""
    g = torch.Generator().manual_seed(1)
    s = get_strategy("hlora")
    state = s.init_state(per_module_init(), {"h": torch.zeros(3, dtype=torch.float64)})
    updates = []
    for c in MIXED:
        lora = {m: Factor(torch.randn(SHAPES[m][0], r, generator=g, dtype=torch.float64),
                          torch.randn(r, SHAPES[m][1], generator=g, dtype=torch.float64), c.alpha / r)
                for m, r in c.ranks.items()}
        updates.append(Update(c.id, lora, {"h": torch.zeros(3, dtype=torch.float64)}, c.num_examples))
    p = [c.num_examples / sum(x.num_examples for x in MIXED) for c in MIXED]
    new = s.aggregate(state, updates)
    glob = s.global_adapter(new)
    for m in SHAPES:
        dense = sum(pk * u.lora[m].scale * u.lora[m].B @ u.lora[m].A for pk, u in zip(p, updates))
        torch.testing.assert_close(glob[m].delta(), dense, rtol=1e-9, atol=1e-9)
        U, S, Vt = torch.linalg.svd(dense, full_matrices=False)
        for c in [*MIXED, ClientSpec(7, {"q": 3, "v": 4}, 12.0, 1)]:
            f = s.dispatch(new, c, torch.Generator()).lora[m]
            r = c.ranks[m]
            assert f.rank == r and f.scale == pytest.approx(c.alpha / r)
            best = (U[:, :r] * S[:r]) @ Vt[:r]
            torch.testing.assert_close(f.delta(), best, rtol=1e-8, atol=1e-8)


def test_hetlora_prunes_each_module_above_rank_1():
    s = get_strategy("hetlora", prune=True, prune_threshold=0.1)
    state = s.init_state(per_module_init(), {"h": torch.zeros(3, dtype=torch.float64)})
    c = ClientSpec(0, {"q": 1, "v": 4}, 16.0, 1)
    g = torch.Generator().manual_seed(0)
    lora = {m: Factor(torch.randn(SHAPES[m][0], r, generator=g, dtype=torch.float64),
                      torch.randn(r, SHAPES[m][1], generator=g, dtype=torch.float64), 16.0 / r)
            for m, r in c.ranks.items()}
    lora["v"].B[:, -1] *= 1e-6  # v's last rank carries almost nothing; q (rank 1) cannot be pruned
    new = s.aggregate(state, [Update(0, lora, {"h": torch.zeros(3, dtype=torch.float64)}, 1)])
    assert new.extra["pruned"] == {0: {"q": 1, "v": 3}}
    pl = s.dispatch(new, c, torch.Generator())
    assert {m: f.rank for m, f in pl.lora.items()} == {"q": 1, "v": 3}


# -- end to end ------------------------------------------------------------------------------------------

def test_two_rounds_with_per_layer_ranks(tiny_args, tmp_path):
    from hlora import run
    from hlora.engine import resume
    from tests.test_run import tiny_config

    out = tmp_path / "r"
    res = run(tiny_config(tiny_args, out, ranks="2", layer_ranks="value:3-5"))
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["layer_ranks"] == {"value": "3-5"} and cfg["client_ranks"] == [2, 2, 2, 2]
    layers = cfg["client_layer_ranks"]
    assert len(layers) == 4 and all(set(x) == {"value"} and 3 <= x["value"] <= 5 for x in layers)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    # tiny BERT: 2 layers x (query at rank 2, value at the client's rank), 32 x 32; head 2 x 32 + 2; float32
    for r in rows:
        sent = sum((2 * 2 * 64 + 2 * layers[c]["value"] * 64 + 2 * 32 + 2) * 4 for c in r["clients"])
        assert r["uplink_bytes"] == sent
        assert r["ranks"] == [layers[c]["value"] for c in r["clients"]]  # each client's largest rank
        assert set(r["energy_kept"]) == {str(k) for k in {2, *(x["value"] for x in layers)}}
    # the run directory resumes: its recorded ranks match the ranks drawn again
    (out / "summary.json").unlink()
    again = resume(out)
    assert again.summary["final_accuracy"] == res.summary["final_accuracy"]
    # a rank above a layer's width is refused before training
    with pytest.raises(ConfigError, match="rank 64 is above the width 32"):
        run(tiny_config(tiny_args, tmp_path / "w", layer_ranks="query:64"))
    with pytest.raises(ConfigError, match="--layer-ranks key: no adapted layer matches"):
        run(tiny_config(tiny_args, tmp_path / "k", layer_ranks="key:4"))


def test_the_cli_refuses_a_bad_rank_file_with_exit_2(tiny_args, tmp_path, capsys):
    from tests.test_cli import run_cli

    f = write(tmp_path / "r.csv", "0,2\n1,3\n2,4\n")  # 4 clients in tiny_args
    code, text = run_cli(["run", *tiny_args, "--rank-file", f, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "no rank for client 3 (--clients 4)" in " ".join(text.split())
    f = write(tmp_path / "w.csv", "0,2\n1,3\n2,64\n3,4\n")
    code, text = run_cli(["run", *tiny_args, "--rank-policy", "file", "--rank-file", f, "--out",
                          str(tmp_path / "o2")], capsys)
    assert code == 2 and "rank 64 is above the width 32" in " ".join(text.split())


@pytest.mark.parametrize("key", ["layer-ranks", "rank-policy", "rank-file"])
def test_flower_refuses_rank_policies_and_per_layer_ranks(key):
    from hlora.engine.flower.settings import run_settings

    with pytest.raises(ConfigError, match=f"run-config key '{key}': each node gives its rank .*node-config"):
        run_settings({key: "x"})


def test_a_run_with_the_data_policy_gives_ranks_by_partition_size(tiny_args, tmp_path):
    from hlora import run
    from hlora.checkpoint import load_checkpoint
    from tests.test_run import tiny_config

    out = tmp_path / "d"
    run(tiny_config(tiny_args, out, rounds=1, ranks="2-4", rank_policy="data", partition="dirichlet", alpha=0.3))
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    sizes = [len(p) for p in load_checkpoint(out)[1]["partition"]]
    assert cfg["rank_policy"] == "data" and cfg["client_ranks"] == data_ranks(2, 4, sizes)
    assert cfg["client_layer_ranks"] == []
