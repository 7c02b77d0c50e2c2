"""--log: the rows, config and summary of a tiny run in TensorBoard and MLflow (read back with their own
readers), resume without duplicate steps, compare cells grouped, a missing backend refused before training."""

import json
import os
import sys

import pytest

from hlora import run
from hlora.engine import resume
from hlora.engine import simulation
from hlora.tracking import client_scalars, round_scalars
from tests.test_cli import run_cli
from tests.test_run import tiny_config

tb_reader = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
mlflow = pytest.importorskip("mlflow")


def tb_scalars(out) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of ``OUT/tb`` as (step, value) pairs, read by TensorBoard's own EventAccumulator (which
    drops what a resumed writer purged)."""
    acc = tb_reader.EventAccumulator(str(out / "tb"), size_guidance={tb_reader.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_run(out, store=None):
    """The one MLflow run of the store (``OUT/mlruns`` unless given), and its client."""
    client = mlflow.MlflowClient(tracking_uri=(store or out / "mlruns").resolve().as_uri())
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1
    return client, runs[0]


def history(client, run_id, key) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def killed_before_checkpoint(monkeypatch, rnd: int):
    """The run stops after round ``rnd`` was logged, before its checkpoint (as kill -9 there would);
    returns the real save_checkpoint, to put back before the resume."""
    save = simulation.save_checkpoint

    def save_or_stop(path, state, **kw):
        if state.round == rnd:
            raise KeyboardInterrupt
        save(path, state, **kw)

    monkeypatch.setattr(simulation, "save_checkpoint", save_or_stop)
    return save


def test_a_tiny_run_logs_every_round_its_config_and_summary(tiny_args, tmp_path):
    out = tmp_path / "tiny"
    res = run(tiny_config(tiny_args, out, log="tensorboard,mlflow"))
    rows = res.rows
    expected = {k for r in rows for k in round_scalars(r)}
    ranks = sorted(set(res.rows[0]["ranks"]) | set(res.rows[1]["ranks"]))
    assert {"accuracy", "eval_loss", "f1", "train_loss", "uplink_bytes", "downlink_bytes", "seconds",
            "seconds_train", "seconds_aggregate", "seconds_eval", "rejected", "skipped"} <= expected
    assert {f"energy_kept/rank_{r}" for r in ranks} <= expected

    tb = tb_scalars(out)
    assert expected <= set(tb)
    for key in expected:
        assert [s for s, _ in tb[key]] == [1, 2], key
        assert [v for _, v in tb[key]] == pytest.approx([round_scalars(r)[key] for r in rows], rel=1e-6)
    for row in rows:  # each sampled client's train loss and rank, at its round
        curves = client_scalars(row)
        assert len(curves) == 2 * len(row["clients"])
        for key, value in curves.items():
            assert (row["round"], pytest.approx(value, rel=1e-6)) in tb[key]
    assert tb["summary/final_accuracy"] == [(2, pytest.approx(res.summary["final_accuracy"]))]

    client, found = mlflow_run(out)
    assert found.info.run_name == "tiny" and found.info.status == "FINISHED"
    assert client.get_experiment(found.info.experiment_id).name == "hlora"
    assert found.data.params["strategy"] == "hlora" and found.data.params["clients"] == "4"
    assert found.data.params["log"] == "tensorboard,mlflow"
    for key in expected:
        steps, values = zip(*history(client, found.info.run_id, key))
        assert list(steps) == [r["round"] for r in rows], key
        assert list(values) == pytest.approx([round_scalars(r)[key] for r in rows], rel=1e-6), key
    assert found.data.metrics["summary/final_accuracy"] == pytest.approx(res.summary["final_accuracy"])
    assert json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"] == found.info.run_id


def test_resume_continues_the_same_runs_with_no_step_twice(tiny_args, tmp_path, monkeypatch):
    """Killed after round 2 was logged but before its checkpoint: the resumed run recomputes round 2 and
    logs it once."""
    out = tmp_path / "r"
    save = killed_before_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tiny_args, out, rounds=3, log="tensorboard,mlflow"))
    client, stopped = mlflow_run(out)
    assert stopped.info.status == "KILLED"
    assert [s for s, _ in history(client, stopped.info.run_id, "accuracy")] == [1, 2]
    monkeypatch.setattr(simulation, "save_checkpoint", save)

    res = resume(out)
    client, found = mlflow_run(out)  # the same, one run
    assert found.info.run_id == stopped.info.run_id and found.info.status == "FINISHED"
    for key in ("accuracy", "train_loss", "seconds"):
        assert [s for s, _ in history(client, found.info.run_id, key)] == [1, 2, 3], key
    tb = tb_scalars(out)
    energy = next(k for k in tb if k.startswith("energy_kept/"))
    for key in ("accuracy", "train_loss", "seconds", energy):
        assert [s for s, _ in tb[key]] == [1, 2, 3], key
    assert [v for _, v in tb["accuracy"]] == pytest.approx([r["accuracy"] for r in res.rows])


def test_compare_logs_each_cell_as_a_run_of_the_grids_experiment(tiny_args, tmp_path, capsys):
    grid = tmp_path / "grid"
    code, text = run_cli(["compare", *tiny_args, "--strategies", "hlora,flexlora", "--rounds", "1",
                          "--log", "mlflow", "--out", str(grid)], capsys)
    assert code in (0, None), text
    client = mlflow.MlflowClient(tracking_uri=(grid / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("grid")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["flexlora seed0", "hlora seed0"]
    assert {r.data.params["strategy"] for r in runs} == {"hlora", "flexlora"}
    assert not (grid / "hlora" / "seed0" / "mlruns").exists()  # one store for the grid


def test_a_backend_that_is_not_installed_fails_before_training(tiny_args, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    out = tmp_path / "no"
    code, text = run_cli(["run", *tiny_args, "--log", "tensorboard,mlflow", "--out", str(out)], capsys)
    assert code == 2 and len(text.strip().splitlines()) == 1
    assert "the mlflow package is not installed" in text and 'pip install "hlora[mlflow]"' in text
    assert not out.exists()  # nothing was loaded, let alone trained
    code, text = run_cli(["run", *tiny_args, "--log", "tensorbord", "--out", str(out)], capsys)
    assert code == 2 and "--log takes tensorboard, mlflow, wandb" in text and "'tensorbord'" in text


def test_wandb_runs_offline_without_a_key_and_resumes_the_same_run(tiny_args, tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # not in the test extra: this runs where wandb is installed
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name in ("WANDB_MODE", "WANDB_SILENT"):  # set by the run: restored after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    out = tmp_path / "w"
    save = killed_before_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tiny_args, out, rounds=3, log="wandb"))
    assert os.environ["WANDB_MODE"] == "offline"
    first = json.loads((out / "tracking.json").read_text())["wandb"]
    assert first["last_step"] == 2
    monkeypatch.setattr(simulation, "save_checkpoint", save)
    resume(out)
    again = json.loads((out / "tracking.json").read_text())["wandb"]
    assert again == {"id": first["id"], "last_step": 3}
    parts = sorted((out / "wandb").glob(f"offline-run-*-{first['id']}"))
    assert len(parts) >= 1  # the resumed part has the same id (two parts, unless both began in one second)


def test_the_flower_run_config_takes_the_tracking_keys():
    from hlora.config import ConfigError
    from hlora.engine.flower.settings import run_settings

    cfg, _ = run_settings({"log": "tensorboard, mlflow", "log-group": "site-a", "mlflow-uri": ""})
    assert cfg.log == ["tensorboard", "mlflow"] and cfg.log_group == "site-a" and cfg.mlflow_uri is None
    with pytest.raises(ConfigError, match="^run-config: log takes"):
        run_settings({"log": "neptune"})
