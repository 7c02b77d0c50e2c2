"""The result as a plain PEFT adapter; checkpoints and resume after kill -9; eval and predict."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hlora import run
from hlora.data import encode
from hlora.inference import Predictor, export_run, load_run
from tests.test_cli import run_cli
from tests.test_run import tiny_config


@pytest.fixture(scope="module")
def finished_run(tiny_model, tiny_mrpc, tmp_path_factory):
    train, dev = tiny_mrpc
    args = ["--model", tiny_model, "--train", train, "--dev", dev, "--task", "mrpc", "--text-columns",
            "#1 String,#2 String", "--label-column", "Quality", "--clients", "4", "--per-round", "3",
            "--rounds", "2", "--local-epochs", "1", "--batch-size", "8", "--max-length", "48", "--ranks", "2-4",
            "--lr", "0.01"]
    return run(tiny_config(args, tmp_path_factory.mktemp("fin") / "run"))


def peft_logits(adapter_dir, model_path, data):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    out = []
    with torch.inference_mode():
        for i in range(len(data)):
            batch = data.batch([i])
            batch.pop("labels")
            out.append(model(**batch).logits[0])
    return torch.stack(out)


def test_exported_adapter_loads_with_plain_peft_and_predicts_identically(finished_run, tiny_model):
    out = finished_run.out
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["modules_to_save"] == ["classifier"]
    p = Predictor(load_run(out))
    dev = encode(p.tokenizer, p.task.dev, 48)
    from hlora.metrics import predict_logits

    ours = predict_logits(p.fm, p.adapter, p.run.head, dev, 16)
    theirs = peft_logits(out / "adapter", tiny_model, dev)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
    acc = float((ours.argmax(-1) == dev.labels).float().mean())
    assert acc == pytest.approx(finished_run.summary["final_accuracy"])
    # the global update is not zero: the adapter changes the model
    assert finished_run.summary["adapter_rank"] >= 2


def test_export_at_rank_r_keeps_the_best_truncation(finished_run, tmp_path, capsys, tiny_model):
    code, text = run_cli(["export", str(finished_run.out), "--rank", "1", "--out", str(tmp_path / "r1")], capsys)
    assert code in (0, None) and "keeps" in text and "% of the update's energy" in text
    cfg = json.loads((tmp_path / "r1" / "adapter_config.json").read_text())
    assert cfg["r"] == 1 and cfg["lora_alpha"] == 1
    trained = load_run(finished_run.out)
    full, _ = trained.truncated(None)
    one, kept = trained.truncated(1)
    assert 0 < kept < 1
    for m in full:
        U, S, Vh = torch.linalg.svd(full[m].delta())
        torch.testing.assert_close(one[m].delta(), S[0] * torch.outer(U[:, 0], Vh[0]), rtol=1e-4, atol=1e-6)
    before = (tmp_path / "r1" / "adapter_config.json").read_text()
    code, text = run_cli(["export", str(finished_run.out), "--out", str(tmp_path / "r1")], capsys)
    assert code == 2 and "not empty" in text  # nothing is overwritten
    assert (tmp_path / "r1" / "adapter_config.json").read_text() == before
    kept_full = export_run(trained, None, tmp_path / "full")
    assert kept_full == pytest.approx(1.0)


def test_eval_and_predict_commands(finished_run, capsys, tiny_mrpc):
    code, text = run_cli(["eval", str(finished_run.out), "--dev", tiny_mrpc[1]], capsys)
    assert code in (0, None)
    acc = f"accuracy {finished_run.summary['final_accuracy']:.4f}"
    assert text.count(acc) == 2  # the dev set, and the same file given again
    code, text = run_cli(["predict", str(finished_run.out), "The cat sat.", "A cat was sitting."], capsys)
    assert code in (0, None) and text.split("\t")[0].strip() in ("0", "1")
    code, text = run_cli(["predict", str(finished_run.out), "only one sentence"], capsys)
    assert code == 2 and "sentence pairs" in text
    for command in (["eval"], ["predict"], ["export", "--out", "x"]):  # one global model: no client's own
        code, text = run_cli([command[0], str(finished_run.out), *command[1:], "--client", "0"]
                             + (["a", "b"] if command[0] == "predict" else []), capsys)
        assert code == 2 and "trains one global model" in text and text.count("\n") == 1


def _metrics(path):
    return [{k: v for k, v in json.loads(x).items() if not k.startswith("seconds")}
            for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_kill_9_gives_the_same_metrics(tiny_args, tmp_path, capsys):
    args = [a for a in tiny_args]
    args[args.index("--rounds") + 1] = "5"
    args[args.index("--clients") + 1] = "6"
    args[args.index("--per-round") + 1] = "4"
    ref = tmp_path / "ref"
    code, _ = run_cli(["run", *args, "--out", str(ref)], capsys)
    assert code in (0, None)

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hlora.cli", "run", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    metrics = killed / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(metrics.read_text().splitlines())
    assert 2 <= done < 5, "the run was not killed mid-way"
    assert not (killed / "summary.json").exists()

    code, text = run_cli(["run", *args, "--out", str(killed)], capsys)
    assert code == 2 and "--resume" in text  # never overwritten silently
    code, text = run_cli(["run", "--resume", str(killed)], capsys)
    assert code in (0, None) and "resuming at round" in text
    assert _metrics(killed) == _metrics(ref)
    assert json.loads((killed / "summary.json").read_text())["final_accuracy"] == \
        json.loads((ref / "summary.json").read_text())["final_accuracy"]
    code, text = run_cli(["run", "--resume", str(killed)], capsys)
    assert code == 2 and "already finished" in text


def test_a_run_resumed_on_other_code_says_so(tiny_args, tmp_path, capsys):
    """The checkpoint keeps the code of each part of a run; the summary names the earlier parts' commits."""
    from hlora.checkpoint import CHECKPOINT

    out = tmp_path / "r"
    run(tiny_config(tiny_args, out))
    first = json.loads((out / "summary.json").read_text())["provenance"]
    assert "resumed_from" not in first
    saved = torch.load(out / CHECKPOINT, weights_only=True)
    assert saved["provenance"] == [first]
    # the run's earlier part ran on commit abc (as if the checkout moved before the resume)
    saved["provenance"] = [{"hlora": "0.1.0", "git_commit": "abc"}]
    torch.save(saved, out / CHECKPOINT)
    (out / "summary.json").unlink()
    code, text = run_cli(["run", "--resume", str(out)], capsys)
    assert code in (0, None), text
    resumed = json.loads((out / "summary.json").read_text())["provenance"]
    assert resumed["resumed_from"] == ["abc"] and resumed["torch"] == first["torch"]
    # a checkpoint from before provenance was recorded: the earlier part's code is unknown
    saved.pop("provenance")
    torch.save(saved, out / CHECKPOINT)
    (out / "summary.json").unlink()
    code, text = run_cli(["run", "--resume", str(out)], capsys)
    assert json.loads((out / "summary.json").read_text())["provenance"]["resumed_from"] == ["?"]


def test_checkpoint_is_written_atomically(tiny_args, tmp_path):
    res = run(tiny_config(tiny_args, tmp_path / "r", rounds=1))
    assert (res.out / "checkpoint.pt").exists()
    assert not list(res.out.glob("*.tmp"))
