import pytest

from hlora.config import ConfigError, RunConfig, draw_ranks, load_config, parse_ranks


def test_rank_specs():
    assert parse_ranks("2-8") == ("range", [2, 8])
    assert parse_ranks("8") == ("list", [8])
    assert parse_ranks("2,4,8") == ("list", [2, 4, 8])
    assert draw_ranks("2,4,8", 5, 0) == [2, 4, 8, 2, 4]
    assert draw_ranks("8", 3, 0) == [8, 8, 8]


def test_range_draw_is_uniform_over_the_range_and_seeded():
    r = draw_ranks("2-8", 2000, seed=1)
    assert set(r) == set(range(2, 9))
    assert r == draw_ranks("2-8", 2000, seed=1) and r != draw_ranks("2-8", 2000, seed=2)
    assert all(abs(r.count(v) / 2000 - 1 / 7) < 0.03 for v in range(2, 9))


@pytest.mark.parametrize("spec,msg", [("0", "at least 1"), ("8-2", "empty"), ("x", "--ranks takes")])
def test_bad_ranks(spec, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_ranks(spec)


@pytest.mark.parametrize(
    "override,msg",
    [({"per_round": 200}, "--per-round must be between 1 and --clients"), ({"alpha": 0.0}, "--alpha"),
     ({"alpha": -1.0}, "--alpha"), ({"rounds": 0}, "--rounds"), ({"partition": "zipf"}, "--partition")],
)
def test_bad_options(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, override)


def test_config_file_then_overrides(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("task: rte\nrounds: 12\nper-round: 5\nranks: 8\ntarget_modules: query,key\n")
    cfg = load_config(p, {"rounds": 3, "lr": None})
    assert (cfg.task, cfg.rounds, cfg.per_round, cfg.ranks) == ("rte", 3, 5, "8")
    assert cfg.target_modules == ["query", "key"] and cfg.lr == RunConfig().lr


def test_strategy_options_in_a_config_file(tmp_path):
    p = tmp_path / "exp.yaml"
    for text in ("strategy: hetlora\nstrategy_options: {norm_weights: true, prune: true}\n",
                 "strategy: hetlora\nstrategy-options: norm_weights=true, prune=true\n",
                 "strategy: hetlora\nstrategy_options: [norm_weights=true, prune=true]\n"):
        p.write_text(text)
        assert load_config(p, {}).strategy_options == {"norm_weights": True, "prune": True}
    p.write_text("strategy_options: 3\n")
    with pytest.raises(ConfigError, match="strategy_options takes a mapping"):
        load_config(p, {})


def test_a_run_on_local_files_is_named_after_them():
    assert load_config(None, {"train": "data/claims_train.tsv", "dev": "d.tsv"}).task == "claims_train"
    assert load_config(None, {"train": "x.tsv", "dev": "d.tsv", "task": "mine"}).task == "mine"
    assert load_config(None, {}).task == "mrpc"


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml", {})
    bad = tmp_path / "bad.yaml"
    bad.write_text("roundz: 3\n")
    with pytest.raises(ConfigError, match="unknown option 'roundz'"):
        load_config(bad, {})


def test_numbers_are_checked_and_coerced(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("rounds: '7'\nlr: '0.01'\n")
    cfg = load_config(p, {})
    assert cfg.rounds == 7 and cfg.lr == 0.01
    p.write_text("rounds: many\n")
    with pytest.raises(ConfigError, match="option rounds expects an integer, got 'many'"):
        load_config(p, {})
