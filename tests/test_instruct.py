"""Decoder LMs on instruction data (--task instruct): data, masking, metrics, every strategy, export."""

import json
import math

import pytest
import torch

from hlora import load_config, run
from hlora.data import DataError, Fields, encode_instruct, load_task
from hlora.data.instruct import IGNORE, format_prompt, read_instruct, rouge_l
from hlora.strategies import names
from hlora.toy import row_texts, synthetic_instructions, tiny_llama, write_jsonl


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory):
    """A 2-layer, 64-wide random Llama with a word tokenizer, and a synthetic instruction set."""
    folder = tmp_path_factory.mktemp("tiny-decoder")
    rows = synthetic_instructions(96, seed=0), synthetic_instructions(12, seed=1)
    tiny_llama(folder / "model", row_texts(rows[0] + rows[1]))
    train = write_jsonl(folder / "train.jsonl", rows[0])
    dev = write_jsonl(folder / "dev.jsonl", rows[1])
    return str(folder / "model"), str(train), str(dev)


def instruct_config(tiny_decoder, out, **extra):
    model, train, dev = tiny_decoder
    options = dict(
        task="instruct", model=model, train=train, dev=dev, target_modules="q_proj,k_proj,v_proj,o_proj",
        clients=4, per_round=2, rounds=2, local_epochs=1, batch_size=8, max_length=64, ranks="2-4",
        gen_samples=2, max_new_tokens=6, lr=1e-2, out=str(out),
    )
    options.update(extra)
    return load_config(None, options)


def test_fields_are_found_by_their_common_names(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add.", "input": "1 2", "output": "3"}])
    ex, cats = read_instruct(alpaca, Fields())
    assert ex.responses == ["3"] and "### Input:\n1 2" in ex.prompts[0] and cats == [""]
    dolly = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Hi", "context": "", "response": "hello", "category": "b"},
        {"instruction": "Yo", "context": "", "response": "hey", "category": "a"},
    ])
    ex, cats = read_instruct(dolly, Fields())
    assert cats == ["a", "b"] and ex.categories == [1, 0] and ex.prompts[0] == format_prompt("Hi")
    assert "### Input" not in ex.prompts[0]
    own = write_jsonl(tmp_path / "o.jsonl", [{"q": "Why?", "a": "because"}])
    ex, _ = read_instruct(own, Fields(prompt="q", response="a"))
    assert ex.responses == ["because"]
    with pytest.raises(DataError, match="--prompt-field and --response-field"):
        read_instruct(own, Fields())
    bad = write_jsonl(tmp_path / "b.jsonl", [{"q": "Why?", "a": "x"}, {"q": "How?"}])
    with pytest.raises(DataError, match="line 2: no field 'a'"):
        read_instruct(bad, Fields(prompt="q", response="a"))


def test_loss_is_on_response_tokens_only(tiny_decoder):
    from transformers import AutoTokenizer

    model, train, dev = tiny_decoder
    tok = AutoTokenizer.from_pretrained(model)
    task = load_task("instruct", train, dev)
    enc = encode_instruct(tok, task.train, max_length=64)
    for i in range(5):
        ids, labels, p = enc.input_ids[i], enc.labels[i], enc.prompt_lengths[i]
        assert (labels[:p] == IGNORE).all() and (labels[p:] == ids[p:]).all()
        assert ids[-1] == tok.eos_token_id  # EOS closes the response
        assert rouge_l(tok.decode(ids[p:-1]), task.train.responses[i]) == 1.0
    short = encode_instruct(tok, task.train, max_length=12)  # the prompt is cut, the response kept
    assert max(short.lengths) <= 12 and all((lab != IGNORE).any() for lab in short.labels)
    batch = enc.batch([0, 1, 2])
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def test_rouge_l():
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)  # LCS "a c d": P = R = 3/4
    assert rouge_l("the cat", "the cat") == 1.0 and rouge_l("dog", "cat") == 0.0
    assert rouge_l("A B", "a b c d") == pytest.approx(2 * 1 * 0.5 / 1.5)


def test_category_split_is_skewed_and_sizes_differ(tiny_decoder, tmp_path):
    from hlora.engine.simulation import setup

    def purity(partition):
        exp = setup(instruct_config(tiny_decoder, tmp_path / partition, clients=6, alpha=0.1, partition=partition))
        cats = exp.task.train.categories
        assert sorted(i for p in exp.parts for i in p) == list(range(len(cats)))
        share = [max(sum(cats[i] == c for i in part) for c in range(3)) / len(part) for part in exp.parts]
        return sum(share) / len(share), {len(p) for p in exp.parts}

    skewed, sizes = purity("dirichlet")
    mixed, _ = purity("iid")
    assert skewed > mixed + 0.15  # clients hold mostly one task each
    assert len(sizes) > 2  # and different amounts of data


@pytest.mark.parametrize("strategy", [s for s in names() if s != "fedit"] + ["fedit"])
def test_every_strategy_runs_instruct(tiny_decoder, tmp_path, strategy):
    ranks = "3" if strategy == "fedit" else "2-4"
    res = run(instruct_config(tiny_decoder, tmp_path / strategy, strategy=strategy, ranks=ranks))
    assert [r["round"] for r in res.rows] == [1, 2]
    for r in res.rows:
        assert math.isfinite(r["eval_loss"]) and r["perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
        assert 0.0 <= r["rouge_l"] <= 1.0 and "accuracy" not in r
    assert res.summary["final_eval_loss"] == res.rows[-1]["eval_loss"]
    cfg = json.loads((res.out / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["modules_to_save"] is None


@pytest.fixture(scope="module")
def learned(tiny_decoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("learned") / "run"
    return run(instruct_config(tiny_decoder, out, rounds=4, local_epochs=4, per_round=4))


def test_loss_falls_on_the_synthetic_set(learned):
    losses = [r["eval_loss"] for r in learned.rows]
    assert losses[-1] < losses[0] - 0.5, losses


def test_exported_adapter_loads_with_plain_peft_and_gives_the_same_loss(learned, tiny_decoder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path, train, dev = tiny_decoder
    base = AutoModelForCausalLM.from_pretrained(model_path)
    model = PeftModel.from_pretrained(base, str(learned.out / "adapter")).eval()
    tok = AutoTokenizer.from_pretrained(model_path)
    enc = encode_instruct(tok, load_task("instruct", train, dev).dev, max_length=64)
    total = count = 0.0
    with torch.inference_mode():
        for i in range(len(enc)):
            b = enc.batch([i])
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            target = b["labels"][:, 1:]
            total += float(torch.nn.functional.cross_entropy(
                logits[0, :-1], target[0], ignore_index=IGNORE, reduction="sum"))
            count += int((target != IGNORE).sum())
    assert total / count == pytest.approx(learned.rows[-1]["eval_loss"], rel=1e-4)


def test_bf16_base_with_gradient_checkpointing_trains_float32_adapters(tiny_decoder, tmp_path):
    from hlora.engine.simulation import setup

    cfg = instruct_config(tiny_decoder, tmp_path / "bf", dtype="bfloat16", gradient_checkpointing=True, rounds=1)
    exp = setup(cfg)
    assert next(exp.fm.model.parameters()).dtype == torch.bfloat16 and getattr(exp.fm.model, "is_activation_checkpointing", None) or exp.fm.model.is_gradient_checkpointing
    res = run(instruct_config(tiny_decoder, tmp_path / "bf2", dtype="bfloat16", gradient_checkpointing=True,
                              rounds=1))
    assert math.isfinite(res.rows[0]["eval_loss"]) and res.rows[0]["uplink_bytes"] > 0


def test_instruct_errors_are_one_line(tiny_decoder, tmp_path, capsys):
    from tests.test_cli import run_cli

    model, train, dev = tiny_decoder
    argv = ["run", "--task", "instruct", "--train", train, "--dev", dev, "--clients", "4", "--per-round", "2",
            "--out", str(tmp_path / "a")]
    code, err = run_cli(argv, capsys)
    assert code == 2 and "needs a decoder language model" in err
    code, err = run_cli(["run", "--task", "instruct", "--model", model, "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "--task instruct needs --train and --dev" in err


def test_eval_predict_export_of_an_lm_run(learned, tmp_path, capsys):
    from tests.test_cli import run_cli

    code, text = run_cli(["eval", str(learned.out)], capsys)
    assert code in (None, 0) and f"eval_loss {learned.rows[-1]['eval_loss']:.4f}" in text
    code, text = run_cli(["predict", str(learned.out), "Give the opposite of the word.", "hot"], capsys)
    assert code in (None, 0) and text.count("\n") == 1  # one greedy response (may be empty this early)
    code, _ = run_cli(["export", str(learned.out), "--rank", "1", "--out", str(tmp_path / "r1")], capsys)
    assert json.loads((tmp_path / "r1" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


def test_summary_has_the_final_perplexity_without_generation(tmp_path):
    """--gen-samples 0 leaves ROUGE-L out of the rows; the summary still has the final perplexity."""
    from hlora.metrics import MetricsLog

    log = MetricsLog(tmp_path)
    for rnd, loss in [(1, 2.0), (2, 1.5)]:
        log.append({"round": rnd, "eval_loss": loss, "perplexity": math.exp(loss),
                    "uplink_bytes": 1, "downlink_bytes": 2})
    summary = log.summary()
    assert summary["final_perplexity"] == math.exp(1.5) and "final_rouge_l" not in summary
    assert summary["final_eval_loss"] == 1.5 and summary["best_round"] == 2
