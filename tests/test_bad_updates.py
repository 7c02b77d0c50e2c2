"""One broken client must not poison the server: each fault is injected into a real run."""

import pytest
import torch

import hlora.engine.simulation as sim
from hlora import run
from hlora.factors import Factor
from hlora.strategies import Payload, Update
from hlora.validate import norm_outliers, update_problem
from tests.test_run import tiny_config


def corrupt(kind, u: Update) -> Update:
    m = next(iter(u.lora))
    f = u.lora[m]
    if kind == "nan":
        B = f.B.clone()
        B[0, 0] = float("nan")
        u.lora[m] = Factor(B, f.A, f.scale)
    elif kind == "inf":
        u.head = {k: torch.full_like(v, float("inf")) for k, v in u.head.items()}
    elif kind == "shape":
        u.lora[m] = Factor(torch.zeros(f.B.shape[0], f.rank + 1), torch.zeros(f.rank + 1, f.A.shape[1]), f.scale)
    elif kind == "missing":
        del u.lora[m]
    elif kind == "huge":
        u.lora = {k: Factor(1e4 * g.B, g.A, g.scale) for k, g in u.lora.items()}
    elif kind == "raise":
        raise RuntimeError("out of memory on the client")
    return u


@pytest.fixture
def faulty(monkeypatch):
    """Make client 0 misbehave in every round it is sampled."""
    def install(kind):
        real = sim.train_client

        def train_client(*args, **kwargs):
            u = real(*args, **kwargs)
            return corrupt(kind, u) if kwargs["client_id"] == 0 else u

        monkeypatch.setattr(sim, "train_client", train_client)
    return install


@pytest.mark.parametrize("kind,reason", [
    ("nan", "NaN or Inf in the factors"), ("inf", "NaN or Inf in the head"), ("shape", "wrong shape"),
    ("missing", "missing modules"), ("huge", "the round's median"), ("raise", "training failed: RuntimeError"),
])
def test_a_faulty_client_is_rejected_and_recorded(kind, reason, faulty, tiny_args, tmp_path):
    faulty(kind)
    res = run(tiny_config(tiny_args, tmp_path / kind, clients=4, per_round=4, rounds=2))
    for row in res.rows:
        assert [r["client"] for r in row["rejected"]] == [0]
        assert reason in row["rejected"][0]["reason"]
        assert not row["skipped"]
    # the global model is what the three healthy clients make: same as a run in which client 0's update is dropped
    assert all(torch.isfinite(torch.tensor(r["accuracy"])) for r in res.rows)


def test_rejected_client_does_not_change_the_aggregate(faulty, tiny_args, tmp_path, monkeypatch):
    """With client 0 sending NaN, the run equals one where client 0's update never arrives."""
    faulty("nan")
    bad = run(tiny_config(tiny_args, tmp_path / "bad", clients=4, per_round=4, rounds=2))
    monkeypatch.undo()
    real = sim.train_client

    def drop_zero(*args, **kwargs):
        if kwargs["client_id"] == 0:
            raise RuntimeError("dropped")
        return real(*args, **kwargs)

    monkeypatch.setattr(sim, "train_client", drop_zero)
    dropped = run(tiny_config(tiny_args, tmp_path / "dropped", clients=4, per_round=4, rounds=2))
    assert [r["accuracy"] for r in bad.rows] == [r["accuracy"] for r in dropped.rows]
    assert [r["eval_loss"] for r in bad.rows] == [r["eval_loss"] for r in dropped.rows]


def test_below_min_clients_the_round_is_skipped_and_the_model_unchanged(faulty, tiny_args, tmp_path):
    faulty("raise")
    res = run(tiny_config(tiny_args, tmp_path / "skip", clients=4, per_round=4, rounds=2, min_clients=4))
    assert all(r["skipped"] for r in res.rows)
    # the global model never moved: both rounds evaluate the initial model
    assert res.rows[0]["accuracy"] == res.rows[1]["accuracy"]
    assert res.rows[0]["eval_loss"] == res.rows[1]["eval_loss"]


def test_validation_rules_as_pure_functions():
    d, k, r = 6, 5, 2
    payload = Payload({"m": Factor(torch.zeros(d, r), torch.zeros(r, k), 2.0)}, {"h": torch.zeros(3)})
    good = Update(0, {"m": Factor(torch.randn(d, r), torch.randn(r, k), 2.0)}, {"h": torch.ones(3)}, 5)
    assert update_problem(good, payload) is None
    wrong_rank = Update(0, {"m": Factor(torch.randn(d, 3), torch.randn(3, k), 2.0)}, {"h": torch.ones(3)}, 5)
    assert "wrong shape" in update_problem(wrong_rank, payload)
    extra = Update(0, {**good.lora, "x": good.lora["m"]}, good.head, 5)
    assert "unexpected modules" in update_problem(extra, payload)
    empty = Update(0, good.lora, good.head, 0)
    assert "num_examples" in update_problem(empty, payload)
    wrong_scale = Update(0, {"m": Factor(good.lora["m"].B, good.lora["m"].A, 1.0)}, good.head, 5)
    assert "wrong LoRA scaling" in update_problem(wrong_scale, payload)
    picks = Payload(payload.lora, payload.head, info={"indices": {"m": torch.tensor([0, 3])}})
    forged = Update(0, good.lora, good.head, 5, info={"indices": {"m": torch.tensor([0, 7])}})
    assert "metadata" in update_problem(forged, picks)
    # the norm check measures the change from what was sent, not the size of the adapter
    start = Factor(torch.full((d, r), 50.0), torch.ones(r, k), 1.0)
    sent = [Payload({"m": start}, {}) for _ in range(5)]
    ups = [Update(i, {"m": Factor(start.B + (100 if i == 3 else 1), start.A, 1.0)}, {}, 1) for i in range(5)]
    assert list(norm_outliers(ups, sent, 10.0)) == [3]
    assert norm_outliers(ups, sent, 0) == {}  # 0 turns the check off
    same = [Update(i, {"m": Factor(start.B + 1, start.A, 1.0)}, {}, 1) for i in range(5)]
    assert norm_outliers(same, sent, 10.0) == {}
