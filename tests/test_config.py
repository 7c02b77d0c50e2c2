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


# --- client objectives, server optimizers, speed options, presets ----------------------------------

from tests.test_cli import run_cli  # noqa: E402


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lr", "-0.01"], "--lr must be > 0, got -0.01"),
        (["--lr=-1"], "--lr must be > 0, got -1.0"),
        (["--prox-mu", "-0.5"], "--prox-mu must be >= 0 (0: off), got -0.5"),
        (["--logit-adjust", "-1"], "--logit-adjust must be >= 0 (0: off), got -1.0"),
        (["--server-momentum", "1"], "--server-momentum must be in [0, 1), got 1.0"),
        (["--server-opt", "avgm", "--server-momentum", "1"], "--server-momentum must be in [0, 1), got 1.0"),
        (["--server-opt", "adam"], "--server-opt adam is elementwise and has no low-rank form on hlora"),
        (["--server-opt", "yogi", "--strategy", "flexlora"], "--server-opt yogi is elementwise"),
        (["--server-opt", "avgm", "--strategy", "flora"],
         "--server-opt avgm is not defined for flora; use avg"),
        (["--server-opt", "nesterov"], "--server-opt must be one of avg, avgm, adam, yogi, got 'nesterov'"),
        (["--server-opt", "avg", "--server-lr", "0.5"], "--server-lr and --server-momentum need --server-opt avgm, adam or yogi"),
        (["--server-opt", "avgm", "--server-lr", "0"], "--server-lr must be > 0"),
        (["--server-opt", "avgm", "--server-rank", "0"], "--server-rank must be at least 1"),
        (["--server-betas", "0.9,1.5", "--server-opt", "adam", "--strategy", "fedit", "--ranks", "8"],
         "--server-betas takes two numbers in [0, 1)"),
        (["--server-betas", "a,b"], "--server-betas takes two numbers b1,b2"),
        (["--server-opt", "adam", "--server-tau", "0", "--strategy", "fedit", "--ranks", "8"],
         "--server-tau must be > 0"),
        (["--local-steps", "0"], "--local-steps must be at least 1, got 0"),
        (["--lr-schedule", "linear"], "--lr-schedule must be constant or cosine, got 'linear'"),
        (["--precision", "fp16"], "--precision must be one of auto, fp32, bf16, got 'fp16'"),
        (["--eval-every", "0"], "--eval-every must be at least 1, got 0"),
        (["--preset", "nope"], "--preset must be one of paper, got 'nope'"),
        (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
        (["--attention", "flash"], "--attention must be auto, sdpa or eager, got 'flash'"),
    ],
)
def test_bad_training_options_are_one_line_and_exit_2(argv, message, capsys, tmp_path):
    code, text = run_cli(["run", *argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert message in " ".join(text.split())
    assert "Traceback" not in text
    assert len(text.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "override,msg",
    [({"local_steps": -3}, "--local-steps"), ({"prox_mu": -1e-3}, "--prox-mu"),
     ({"eval_every": -1}, "--eval-every"), ({"server_opt": "adam", "strategy": "flexlora"}, "elementwise"),
     ({"server_momentum": 1.0}, "--server-momentum"),
     ({"server_opt": "yogi", "strategy": "centralized"}, "not defined for centralized"),
     ({"precision": "half"}, "--precision"), ({"preset": "fast"}, "--preset")],
)
def test_bad_training_options_in_load_config(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, override)


def test_good_training_options():
    cfg = load_config(None, {"server_opt": "avgm", "server_momentum": 0.9, "server_lr": "0.5",
                             "server_rank": "16",
                             "local_steps": 10, "lr_schedule": "cosine", "prox_mu": 0.01, "logit_adjust": 1,
                             "precision": "bf16", "eval_every": 5})
    opt = cfg.server_optimizer()
    assert (opt.name, opt.lr, opt.momentum, opt.rank) == ("avgm", 0.5, 0.9, 16)
    assert cfg.local_steps == 10 and cfg.logit_adjust == 1.0 and cfg.eval_every == 5
    cfg = load_config(None, {"server_opt": "adam", "strategy": "fedit", "ranks": "8",
                             "server_betas": "0.8, 0.95"})
    assert cfg.server_optimizer().betas == (0.8, 0.95)


def test_preset_paper():
    from hlora.config import PRESETS

    cfg = load_config(None, {"preset": "paper"})
    assert cfg.preset == "paper"
    assert cfg.logit_adjust == 0.0 and cfg.server_opt == "avg" and cfg.local_steps is None
    for key, value in PRESETS["paper"].items():
        assert getattr(cfg, key) == value
    # an explicit option wins over the preset
    assert load_config(None, {"preset": "paper", "logit_adjust": 1.0}).logit_adjust == 1.0
    assert load_config(None, {"preset": "paper", "local_steps": 5}).local_steps == 5
    assert load_config(None, {"preset": "paper", "logit_adjust": None}).logit_adjust == 0.0  # None: not given


def test_preset_sits_under_the_file_and_the_options(tmp_path, monkeypatch):
    """The preset's values apply where nothing else sets them; the file and the options win."""
    import hlora.config as config

    monkeypatch.setitem(config.PRESETS, "paper", {**config.PRESETS["paper"], "lr": 0.05, "local_steps": 7,
                                                  "logit_adjust": 0.5})
    cfg = load_config(None, {"preset": "paper"})
    assert (cfg.lr, cfg.local_steps, cfg.logit_adjust) == (0.05, 7, 0.5)
    p = tmp_path / "exp.yaml"
    p.write_text("preset: paper\nlr: 0.02\n")
    cfg = load_config(p, {"local_steps": 3})
    assert (cfg.lr, cfg.local_steps, cfg.logit_adjust) == (0.02, 3, 0.5)
    p.write_text("lr: 0.02\n")
    cfg = load_config(p, {"preset": "paper"})
    assert (cfg.lr, cfg.local_steps) == (0.02, 7)


def test_preset_paper_from_the_command_line(capsys, tmp_path, tiny_args):
    """--preset paper with an explicit option: the option wins, and the saved config says so."""
    import yaml

    args = [a for a in tiny_args]
    args[args.index("--rounds") + 1] = "1"
    out = tmp_path / "p"
    code, _ = run_cli(["run", *args, "--preset", "paper", "--logit-adjust", "1", "--out", str(out)], capsys)
    assert code in (0, None)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["preset"] == "paper" and saved["logit_adjust"] == 1.0 and saved["server_opt"] == "avg"
    assert saved["local_epochs"] == 1 and saved["local_steps"] is None  # --local-epochs 1 given: it wins
