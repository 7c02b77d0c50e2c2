"""Speed options that must not change results silently: bf16 autocast, --eval-every."""

import json

import pytest
import torch

from hlora import run
from hlora.engine import resume
from hlora.metrics import predict_logits
from hlora.model import FederatedModel, load_classifier
from hlora.precision import bf16_supported, precision_context, resolve_precision
from tests.test_run import tiny_config


def test_bf16_autocast_keeps_the_tiny_models_predictions(tiny_model, tiny_mrpc):
    """bf16 and fp32 logits of the same adapter agree to bf16 rounding (max |diff| < 0.05 on logits of
    size ~0.5), and so do their argmax except where fp32's margin is below that tolerance."""
    from hlora.data import encode, load_task
    from hlora.factors import init_factors

    train, dev = tiny_mrpc
    task = load_task("mrpc", train, dev, ["#1 String", "#2 String"], "Quality")
    model, tok = load_classifier(tiny_model, 2, 0)
    fm = FederatedModel(model)
    adapter = init_factors(fm.shapes, 4, torch.Generator().manual_seed(0))
    for f in adapter.values():  # a non-zero update
        f.B.copy_(torch.randn(f.B.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    data = encode(tok, task.dev, 48)
    fp32 = predict_logits(fm, adapter, fm.head_state(), data, 8)
    fm.precision = "bf16"
    bf16 = predict_logits(fm, adapter, fm.head_state(), data, 8)
    assert bf16.dtype == torch.float32 and not torch.equal(fp32, bf16)  # bf16 really ran
    tol = 0.05
    assert (fp32 - bf16).abs().max() < tol
    margin = (fp32[:, 0] - fp32[:, 1]).abs()
    clear = margin > 2 * tol
    assert torch.equal(fp32.argmax(-1)[clear], bf16.argmax(-1)[clear])


def test_autocast_runs_matmuls_in_bf16_and_keeps_parameters_float32():
    lin = torch.nn.Linear(8, 4)
    with precision_context("bf16"):
        y = lin(torch.randn(2, 8))
    assert y.dtype == torch.bfloat16 and lin.weight.dtype == torch.float32
    with precision_context("fp32"):
        assert lin(torch.randn(2, 8)).dtype == torch.float32


def test_auto_precision_picks_bf16_only_when_faster():
    calls = []

    def step(mode: str, slow: str) -> None:
        calls.append(mode)
        if mode == slow:
            import time

            time.sleep(0.02)

    assert resolve_precision("fp32", lambda m: step(m, "bf16")) == "fp32"
    assert resolve_precision("bf16", lambda m: step(m, "fp32")) == "bf16"
    assert calls == []  # an explicit choice is not timed
    expected = "bf16" if bf16_supported() else "fp32"
    assert resolve_precision("auto", lambda m: step(m, "fp32")) == expected
    assert resolve_precision("auto", lambda m: step(m, "bf16")) == "fp32"


def test_eval_every_scores_only_evaluated_rounds_and_always_the_last(tiny_args, tmp_path):
    cfg = tiny_config(tiny_args, tmp_path / "run", rounds=5, eval_every=2)
    result = run(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["round"] for r in rows if "accuracy" in r] == [2, 4, 5]
    assert all("uplink_bytes" in r and "train_loss" in r for r in rows)
    assert result.summary["final_accuracy"] == rows[-1]["accuracy"]
    assert result.summary["best_round"] in (2, 4, 5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_matches_an_uninterrupted_run_under_each_precision(tiny_args, tmp_path, precision):
    whole = run(tiny_config(tiny_args, tmp_path / "whole", rounds=3, precision=precision))
    cut = tiny_config(tiny_args, tmp_path / "cut", rounds=3, precision=precision)
    cut.rounds = 1
    run(cut)  # one round, then continue the same directory to three
    import yaml

    path = tmp_path / "cut" / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    assert saved["precision"] == precision
    saved["rounds"] = 3
    path.write_text(yaml.safe_dump(saved))
    (tmp_path / "cut" / "summary.json").unlink()
    resumed = resume(tmp_path / "cut")
    for a, b in zip(whole.rows, resumed.rows):
        assert a["accuracy"] == b["accuracy"] and a["eval_loss"] == b["eval_loss"]


def test_a_run_written_before_the_training_options_resumes_with_the_papers_training(tiny_args, tmp_path):
    """An old config.yaml (no logit_adjust, precision, ... keys) resumes as it was trained (--preset paper,
    float32), not with today's defaults."""
    import yaml

    cut = tiny_config(tiny_args, tmp_path / "old", rounds=1, preset="paper", precision="fp32")
    run(cut)
    path = tmp_path / "old" / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    new_keys = ("logit_adjust", "prox_mu", "local_steps", "lr_schedule", "client_opt", "adam_eps", "head_opt",
                "head_lr", "server_opt", "server_lr", "server_momentum", "server_betas", "server_tau",
                "server_rank", "client_weights", "precision", "eval_every", "preset", "dropout", "attention")
    old = {k: v for k, v in saved.items() if k not in new_keys}
    old["rounds"] = 2
    path.write_text(yaml.safe_dump(old))
    (tmp_path / "old" / "summary.json").unlink()
    resumed = resume(tmp_path / "old")
    whole = run(tiny_config(tiny_args, tmp_path / "whole", rounds=2, preset="paper", precision="fp32",
                            attention="sdpa"))
    today = run(tiny_config(tiny_args, tmp_path / "today", rounds=2))
    assert [r["eval_loss"] for r in resumed.rows] == [r["eval_loss"] for r in whole.rows]
    assert [r["eval_loss"] for r in today.rows] != [r["eval_loss"] for r in whole.rows]


def test_dropout_and_attention_reach_the_model_and_config_yaml(tiny_args, tmp_path, tiny_model):
    """--dropout sets every dropout of the base; --attention auto resolves (eager on CPU) and config.yaml keeps
    the choice, so a resumed run uses the same attention."""
    import yaml

    from hlora.model import ModelError, set_attention, set_dropout

    model, _ = load_classifier(tiny_model, 2, 0)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and any(m.p > 0 for m in drops)
    set_dropout(model, 0.0)
    assert all(m.p == 0.0 for m in drops) and model.config.hidden_dropout_prob == 0.0
    assert model.config.attention_probs_dropout_prob == 0.0
    with pytest.raises(ModelError, match="--dropout"):
        set_dropout(model, 1.5)
    assert set_attention(model, "eager") == "eager" == model.config._attn_implementation
    assert set_attention(model, "sdpa") == "sdpa" == model.config._attn_implementation
    assert set_attention(model, "auto") == ("sdpa" if torch.cuda.is_available() else "eager")

    result = run(tiny_config(tiny_args, tmp_path / "r", rounds=1, dropout=0.0))
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["dropout"] == 0.0 and saved["attention"] in ("eager", "sdpa") and result.rows
