"""Client objectives (hlora.objectives) against dense float64 references, and their use in local training."""

import math

import pytest
import torch
import torch.nn.functional as F

from hlora.factors import Factor
from hlora.objectives import (
    Objective,
    adjusted_cross_entropy,
    cosine_lr,
    logit_offset,
    smoothed_prior,
    update_change_sq,
)

D, K = 12, 9


def rand_factor(r, scale, seed, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(D, r, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)
    A = torch.randn(r, K, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)
    return Factor(B, A, scale)


# --- the proximal term -----------------------------------------------------------------------------


@pytest.mark.parametrize("r,s,s0", [(4, 4.0, 4.0), (4, 2.0, 16.0), (1, 0.5, 3.0), (8, 1.0, 0.25)])
def test_update_change_sq_is_the_dense_squared_frobenius_norm(r, s, s0):
    f, f0 = rand_factor(r, s, seed=1), rand_factor(r, s0, seed=2)
    ref = ((s * f.B @ f.A - s0 * f0.B @ f0.A) ** 2).sum()
    got = update_change_sq(f, f0)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_update_change_sq_is_zero_for_the_same_update_in_another_scaling():
    f = rand_factor(3, 2.0, seed=3)
    assert float(update_change_sq(f, f)) == pytest.approx(0.0, abs=1e-10)
    assert float(update_change_sq(f, f.with_scale(8.0))) == pytest.approx(0.0, abs=1e-9)


def test_update_change_sq_of_float32_factors_against_a_float64_start():
    f = rand_factor(4, 2.0, seed=4, dtype=torch.float32)
    f0 = rand_factor(4, 4.0, seed=5)
    ref = ((2.0 * f.B.double() @ f.A.double() - 4.0 * f0.B @ f0.A) ** 2).sum()
    got = update_change_sq(f, f0)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(ref), rel=1e-4)


def test_proximal_is_zero_at_the_start_and_its_gradient_is_the_dense_one_away_from_it():
    mu = 0.3
    start = {"a": rand_factor(4, 4.0, seed=6), "b": rand_factor(2, 8.0, seed=7)}
    start_head = {"w": torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(8))}
    obj = Objective(prox_mu=mu, start=start, start_head=start_head)

    at = {m: Factor(f.B.clone().requires_grad_(), f.A.clone().requires_grad_(), f.scale)
          for m, f in start.items()}
    head = {"w": start_head["w"].clone().requires_grad_()}
    value = obj.proximal(at, head)
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-10)
    value.backward()
    for f in at.values():
        assert float(f.B.grad.abs().max()) < 1e-9 and float(f.A.grad.abs().max()) < 1e-9
    assert float(head["w"].grad.abs().max()) == 0.0

    away = {m: rand_factor(f.rank, f.scale, seed=20 + i, grad=True) for i, (m, f) in enumerate(start.items())}
    head = {"w": torch.zeros(2, 5, dtype=torch.float64, requires_grad=True)}
    obj.proximal(away, head).backward()
    # the dense reference: mu/2 (sum_m ||s B A - s0 B0 A0||^2 + ||h - h0||^2)
    ref_f = {m: Factor(f.B.detach().clone().requires_grad_(), f.A.detach().clone().requires_grad_(), f.scale)
             for m, f in away.items()}
    ref_h = torch.zeros(2, 5, dtype=torch.float64, requires_grad=True)
    total = sum(((f.scale * f.B @ f.A - start[m].scale * start[m].B @ start[m].A) ** 2).sum()
                for m, f in ref_f.items())
    ref = 0.5 * mu * (total + ((ref_h - start_head["w"]) ** 2).sum())
    ref.backward()
    for m in away:
        assert float(away[m].B.grad.abs().max()) > 1e-3
        torch.testing.assert_close(away[m].B.grad, ref_f[m].B.grad, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(away[m].A.grad, ref_f[m].A.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(head["w"].grad, ref_h.grad, rtol=1e-12, atol=1e-12)
    assert float(obj.proximal(away, head)) == pytest.approx(float(ref), rel=1e-9)


def test_proximal_is_off_without_mu_or_start():
    f = {"a": rand_factor(2, 1.0, seed=9)}
    assert Objective(prox_mu=0.0, start=f).proximal({"a": rand_factor(2, 1.0, seed=10)}, {}) == 0.0
    assert Objective(prox_mu=1.0).proximal({"a": rand_factor(2, 1.0, seed=10)}, {}) == 0.0


# --- logit adjustment ------------------------------------------------------------------------------


def test_smoothed_prior_and_logit_offset_on_a_toy_label_list():
    client, everyone = [1, 1, 1], [0, 1, 1, 1, 0, 1]
    pi_k = smoothed_prior(client, 2)
    pi = smoothed_prior(everyone, 2)
    assert pi_k.dtype == torch.float64
    torch.testing.assert_close(pi_k, torch.tensor([1 / 5, 4 / 5], dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(pi, torch.tensor([3 / 8, 5 / 8], dtype=torch.float64), rtol=0, atol=1e-15)
    for tau in (1.0, 0.5):
        off = logit_offset(client, everyone, 2, tau)
        assert off.dtype == torch.float32 and off.shape == (2,)
        want = torch.tensor([tau * math.log((1 / 5) / (3 / 8)), tau * math.log((4 / 5) / (5 / 8))])
        torch.testing.assert_close(off, want, rtol=1e-6, atol=1e-7)
    # a class nobody holds: smoothed, not log 0
    three = smoothed_prior([1, 1, 1], 3)
    torch.testing.assert_close(three, torch.tensor([1 / 6, 4 / 6, 1 / 6], dtype=torch.float64))
    assert torch.isfinite(logit_offset([0], [0, 1], 3, 1.0)).all()
    # a client with the federation's own label mix is not adjusted
    assert float(logit_offset(everyone, everyone, 2, 1.0).abs().max()) == 0.0
    assert float(smoothed_prior(torch.tensor([0, 2, 2]), 3).sum()) == pytest.approx(1.0)


def test_adjusted_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 3, generator=g)
    labels = torch.randint(0, 3, (7,), generator=g)
    assert torch.equal(adjusted_cross_entropy(logits, labels, None), F.cross_entropy(logits, labels))
    off = torch.tensor([0.5, -1.0, 2.0])
    adjusted = adjusted_cross_entropy(logits, labels, off)
    torch.testing.assert_close(adjusted, F.cross_entropy(logits + off, labels))
    assert float(adjusted) != pytest.approx(float(F.cross_entropy(logits, labels)))
    # bf16 logits are scored in float32
    out = adjusted_cross_entropy(logits.bfloat16(), labels, None)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.cross_entropy(logits.bfloat16().float(), labels))
    assert Objective(offset=off).data_loss(logits, labels) == adjusted_cross_entropy(logits, labels, off)


# --- the lr schedule -------------------------------------------------------------------------------


def test_cosine_lr():
    lr = 2e-3
    assert cosine_lr(lr, 1, 20) == pytest.approx(lr)
    assert cosine_lr(lr, 20, 20) == pytest.approx(lr / 50)
    assert cosine_lr(lr, 1, 1) == lr
    assert cosine_lr(lr, 1, 2) == pytest.approx(lr) and cosine_lr(lr, 2, 2) == pytest.approx(lr / 50)
    mid = cosine_lr(lr, 11, 21)  # halfway: the mean of lr and lr/50
    assert mid == pytest.approx((lr + lr / 50) / 2)
    values = [cosine_lr(lr, t, 20) for t in range(1, 21)]
    assert all(a > b for a, b in zip(values, values[1:]))


# --- local training --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_setup(tiny_model, tiny_mrpc):
    from hlora.data import encode, load_task
    from hlora.model import FederatedModel, load_classifier

    train, dev = tiny_mrpc
    task = load_task("mrpc", train, dev, ["#1 String", "#2 String"], "Quality")
    model, tok = load_classifier(tiny_model, 2, seed=0)
    fm = FederatedModel(model)
    HEAD0.update(fm.head_state())  # training writes into the head's parameters: keep the seeded one
    return fm, encode(tok, task.train, 48), encode(tok, task.dev, 48)


HEAD0: dict = {}


def payload_for(fm, rank=2, seed=0):
    from hlora.factors import init_factors
    from hlora.strategies import Payload

    lora = init_factors(fm.shapes, rank, torch.Generator().manual_seed(seed))
    lora = {m: Factor(f.B, f.A, 8.0 / rank) for m, f in lora.items()}
    return Payload(lora=lora, head={n: t.clone() for n, t in HEAD0.items()})


@pytest.mark.parametrize("steps,indices", [(7, list(range(10))), (2, list(range(10))), (5, [3])])
def test_local_steps_takes_exactly_that_many_optimizer_steps(tiny_setup, steps, indices):
    """10 examples in batches of 4 make 3 batches a pass: 7 steps cycle the data; 2 stop mid-pass."""
    from hlora.client import train_client

    fm, train, _ = tiny_setup
    seen = []
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def counting_step(self, *a, **k):
        calls["n"] += 1
        return real_step(self, *a, **k)

    torch.optim.AdamW.step = counting_step
    try:
        up = train_client(fm, payload_for(fm), train, indices, client_id=0, epochs=1, lr=1e-3, batch_size=4,
                          seed=3, on_batch=seen.append, local_steps=steps)
    finally:
        torch.optim.AdamW.step = real_step
    assert len(seen) == steps == calls["n"]
    assert all(1 <= n <= 4 for n in seen)
    per_pass = [4, 4, 2] if len(indices) == 10 else [1]
    if steps >= len(per_pass):  # whole passes hold every example once
        full = len(per_pass) * (steps // len(per_pass))
        assert sum(seen[:full]) == len(indices) * (steps // len(per_pass))
    assert up.num_examples == len(indices) and math.isfinite(up.train_loss)


def test_epochs_without_local_steps(tiny_setup):
    from hlora.client import train_client

    fm, train, _ = tiny_setup
    seen = []
    train_client(fm, payload_for(fm), train, list(range(10)), client_id=0, epochs=2, lr=1e-3, batch_size=4,
                 seed=3, on_batch=seen.append)
    assert len(seen) == 6 and sum(seen) == 20


def _first_batch_logits(fm, payload, train, indices, batch_size, seed):
    """The logits train_client's first step sees: same batch order and dropout draws."""
    from hlora.client import length_grouped_batches

    order = torch.Generator().manual_seed(seed)
    chunk = length_grouped_batches(indices, train.lengths, batch_size, order, 32)[0]
    batch = train.batch(chunk)
    fm.install(payload.lora, payload.head)
    torch.manual_seed(seed)
    fm.model.train()
    try:
        with torch.no_grad():
            logits = fm.model(**batch).logits.float()
    finally:
        fm.clear()
    return logits, batch["labels"]


def test_logit_adjustment_changes_training_and_only_training(tiny_setup):
    from hlora.client import train_client
    from hlora.metrics import predict_logits

    fm, train, dev = tiny_setup
    idx = list(range(16))
    offset = torch.tensor([1.5, -1.5])
    kw = dict(client_id=0, epochs=1, lr=1e-2, batch_size=8, seed=5)

    # the first step's loss is CE(logits + offset): the offset does reach the training loss
    one = dict(kw, local_steps=1)
    plain1 = train_client(fm, payload_for(fm), train, idx, **one)
    adj1 = train_client(fm, payload_for(fm), train, idx, **one, objective=Objective(offset=offset))
    logits, labels = _first_batch_logits(fm, payload_for(fm), train, idx, 8, 5)
    assert plain1.train_loss == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    assert adj1.train_loss == pytest.approx(float(F.cross_entropy(logits + offset, labels)), rel=1e-5)
    assert adj1.train_loss != pytest.approx(plain1.train_loss, rel=1e-3)

    plain = train_client(fm, payload_for(fm), train, idx, **kw)
    adj = train_client(fm, payload_for(fm), train, idx, **kw, objective=Objective(offset=offset))
    assert not torch.allclose(plain.head["classifier.bias"], adj.head["classifier.bias"])

    # predicting with the trained adapter gives the raw logits of the model: no offset, whatever trained it
    raw = predict_logits(fm, adj.lora, adj.head, dev, 8)
    fm.install(adj.lora, adj.head)
    fm.model.eval()
    try:
        with torch.no_grad():
            direct = torch.cat([fm.model(**{k: v for k, v in dev.batch([i]).items() if k != "labels"}).logits
                                for i in range(len(dev))])
    finally:
        fm.clear()
    torch.testing.assert_close(raw, direct, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(raw, direct + offset.to(direct.dtype), atol=1e-2)
    assert torch.equal(predict_logits(fm, adj.lora, adj.head, dev, 8), raw)  # nothing stuck in the model


def test_prox_mu_pulls_towards_the_start(tiny_setup):
    from hlora.client import train_client

    fm, train, _ = tiny_setup
    kw = dict(client_id=0, epochs=1, lr=5e-2, batch_size=4, seed=2, local_steps=6)
    start = payload_for(fm, rank=2, seed=1)
    # B = 0 at the start: move it first so the start point is a generic one
    for f in start.lora.values():
        f.B.normal_(generator=torch.Generator().manual_seed(0))
    free = train_client(fm, start, train, list(range(12)), **kw)
    obj = Objective(prox_mu=100.0)
    held = train_client(fm, start, train, list(range(12)), **kw, objective=obj)
    assert obj.start is start.lora and obj.start_head is start.head

    def dist(u):
        return sum(float(update_change_sq(u.lora[m], start.lora[m])) for m in start.lora)

    assert dist(held) < 0.5 * dist(free)


def test_a_run_with_logit_adjustment_evaluates_the_raw_logits(tiny_args, tmp_path):
    """The metrics of a --logit-adjust run are those of the exported model's raw logits."""
    from hlora import run
    from hlora.data import encode
    from hlora.inference import Predictor, load_run
    from hlora.metrics import predict_logits
    from tests.test_run import tiny_config

    res = run(tiny_config(tiny_args, tmp_path / "la", rounds=1, logit_adjust=1.0, lr="0.01"))
    assert res.summary and res.rows[0]["train_loss"] > 0
    p = Predictor(load_run(res.out))
    dev = encode(p.tokenizer, p.task.dev, 48)
    logits = predict_logits(p.fm, p.adapter, p.run.head, dev, 16)
    assert res.rows[0]["accuracy"] == pytest.approx(float((logits.argmax(-1) == dev.labels).float().mean()))
    assert res.rows[0]["eval_loss"] == pytest.approx(float(F.cross_entropy(logits, dev.labels)), rel=1e-5)
