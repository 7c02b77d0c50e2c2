"""FedSA-LoRA (hlora.strategies.fedsa) and the client-state store (hlora.client_state): the average of A
against a dense float64 reference, B kept per client across rounds, personalised evaluation, checkpoint and
resume, and the other strategies' data split unchanged."""

import json

import pytest
import torch

from hlora import run
from hlora.checkpoint import load_checkpoint
from hlora.client import train_client
from hlora.client_state import ClientStates, personal_round, split_holdout
from hlora.config import ConfigError
from hlora.engine.simulation import Reporter, check_strategy, resume, setup
from hlora.factors import Factor, init_factors
from hlora.inference import Predictor, load_run
from hlora.model import FederatedModel, load_classifier
from hlora.strategies import get_strategy
from tests.test_run import tiny_config
from tests.test_strategies import D, K, R, local_update, spec, state_for, trained_updates

HEAD = 3 * 8


def dense_A_reference(updates, specs, previous):
    """Row i of A: the n-weighted average of s_k A_k[i] over the clients holding rank i (float64 loops)."""
    out = previous.clone()
    for i in range(R):
        holders = [(u, c) for u, c in zip(updates, specs) if c.ranks["m"] > i]
        if not holders:
            continue
        n = sum(c.num_examples for _, c in holders)
        out[i] = sum(c.num_examples / n * (u.lora["m"].scale * u.lora["m"].A[i]) for u, c in holders)
    return out


def test_the_aggregate_of_A_is_the_row_wise_weighted_average_and_B_and_head_stay_put():
    s, state = state_for("fedsa")
    specs = [spec(0, 3, n=1), spec(1, 6, alpha=8.0, n=3), spec(2, 5, alpha=32.0, n=2)]  # nobody holds ranks 7, 8
    for rnd in range(3):
        ups = trained_updates(s, state, specs, seed=rnd)
        new = s.aggregate(state, ups)
        g = new.lora["m"]
        torch.testing.assert_close(g.A, dense_A_reference(ups, specs, state.lora["m"].A), rtol=1e-12, atol=1e-12)
        assert torch.equal(g.A[6:], state.init["m"].A[6:])  # rows no client holds keep their value
        assert torch.equal(g.B, torch.zeros(D, R, dtype=torch.float64))  # the server holds no B
        assert torch.equal(new.head["h"], state.head["h"])  # the head is personal (the paper's classifier)
        for c in specs:  # client k receives A'[:r_k] / s_k, and B = the global init (0)
            pl = s.dispatch(new, c, torch.Generator())
            f = pl.lora["m"]
            torch.testing.assert_close(f.scale * f.A, g.A[: c.ranks["m"]], rtol=1e-14, atol=0)
            assert torch.equal(f.B, torch.zeros(D, c.ranks["m"], dtype=torch.float64))
            # only A travels (the personal head does not)
            assert s.downlink_bytes(new, pl) == c.ranks["m"] * K * 8
        state = new


def test_equal_ranks_give_the_papers_plain_average_and_a_shared_head_is_averaged():
    s, state = state_for("fedsa", share_head=True)
    specs = [spec(0, R, n=1), spec(1, R, n=3)]
    ups = trained_updates(s, state, specs)
    new = s.aggregate(state, ups)
    # the client's A (as it trains it) averaged: A = sum_k p_k A_k, the scalings cancel
    got = s.dispatch(new, specs[0], torch.Generator()).lora["m"].A
    torch.testing.assert_close(got, 0.25 * ups[0].lora["m"].A + 0.75 * ups[1].lora["m"].A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new.head["h"], torch.full((3,), 0.75, dtype=torch.float64))
    pl = s.dispatch(new, specs[0], torch.Generator())
    assert s.downlink_bytes(new, pl) == R * K * 8 + HEAD
    assert s.uplink_bytes(ups[0]) == R * K * 8 + HEAD


def test_a_client_keeps_its_B_and_head_and_sends_only_A():
    s, state = state_for("fedsa")
    states = ClientStates()
    specs = [spec(0, 4, n=2), spec(1, 6, n=2)]

    def round_of(state, sampled, seed):
        got, sent = {}, []
        for c in sampled:
            payload = s.dispatch(state, c, torch.Generator())

            def train(p, c=c):
                got[c.id] = p  # what the client trains from
                return local_update(p, c, seed)

            sent.append(personal_round(s, states, c.id, payload, train))
            shared = sent[-1].lora["m"]
            assert torch.equal(shared.B, payload.lora["m"].B)  # B as it was sent: the server sees no B
            assert torch.equal(sent[-1].head["h"], payload.head["h"])  # nor the personal head
            assert s.uplink_bytes(sent[-1]) == c.ranks["m"] * K * 8
        return s.aggregate(state, sent), got

    state, got1 = round_of(state, [specs[0]], seed=1)
    kept = states.get(0)
    assert torch.equal(got1[0].lora["m"].B, torch.zeros(D, 4, dtype=torch.float64))  # round 1: the init B
    assert kept["B"]["m"].abs().min() > 0 and torch.equal(kept["head"]["h"], torch.zeros(3, dtype=torch.float64))
    state1 = state
    state, got2 = round_of(state, specs, seed=2)
    assert torch.equal(got2[0].lora["m"].B, kept["B"]["m"])  # sampled again: its own B from round 1
    assert torch.equal(got2[0].lora["m"].A, s.dispatch(state1, specs[0], torch.Generator()).lora["m"].A)
    assert torch.equal(got2[1].lora["m"].B, torch.zeros(D, 6, dtype=torch.float64))  # never sampled: init B
    assert torch.equal(got2[1].head["h"], state.head["h"])  # and the initial head
    assert states.nbytes() == (D * 4 + D * 6) * 8 + 2 * 3 * 8

    # the mean model is the n-weighted mean of the clients' personal updates (and heads)
    mean = s.mean_state(state, specs, states.entries)
    models = [s.personal_model(state, c, states.get(c.id)) for c in specs]
    want = sum(0.5 * m.lora["m"].delta() for m in models)
    torch.testing.assert_close(s.global_adapter(mean)["m"].delta(), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean.head["h"], 0.5 * models[0].head["h"] + 0.5 * models[1].head["h"])


def test_the_real_client_trains_from_its_own_B_in_its_next_round(tiny_model, tiny_mrpc):
    """train_client on the tiny BERT: round 1 from B = 0, round 2 from the B it trained in round 1."""
    from hlora.data import load_task
    from hlora.data.examples import encode
    from transformers import AutoTokenizer

    model, _ = load_classifier(tiny_model, 2, seed=0)
    fm = FederatedModel(model)
    task = load_task("mrpc", tiny_mrpc[0], tiny_mrpc[1], ["#1 String", "#2 String"], "Quality")
    data = encode(AutoTokenizer.from_pretrained(tiny_model), task.train, 48)
    s = get_strategy("fedsa")
    init = init_factors(fm.shapes, 4, torch.Generator().manual_seed(0))
    head0 = fm.head_state()
    state = s.init_state(init, head0)
    clients = [spec(0, 2), spec(1, 3)]
    clients = [type(c)(c.id, dict.fromkeys(fm.shapes, c.ranks["m"]), 16.0, 12) for c in clients]
    states, seen = ClientStates(), []

    def one(state, c, seed):
        def train(p):
            seen.append((c.id, {m: f.B.clone() for m, f in p.lora.items()}, {n: t.clone() for n, t in p.head.items()}))
            return train_client(fm, p, data, list(range(12 * c.id, 12 * c.id + 12)), client_id=c.id, epochs=1,
                                lr=0.05, batch_size=4, seed=seed, head_opt="sgd", head_lr=0.1)
        return personal_round(s, states, c.id, s.dispatch(state, c, torch.Generator()), train)

    state = s.aggregate(state, [one(state, clients[0], 1)])
    kept = states.get(0)
    assert all(B.abs().max() > 0 for B in kept["B"].values())  # B trained
    state = s.aggregate(state, [one(state, clients[0], 2), one(state, clients[1], 3)])
    (_, B1, _), (_, B2, head2), (_, B_new, head_new) = seen
    assert all(torch.equal(B1[m], torch.zeros_like(B1[m])) for m in B1)
    assert all(torch.equal(B2[m], kept["B"][m]) for m in B2)  # its own B, not the global one
    assert all(torch.equal(head2[n], kept["head"][n]) for n in head2)  # and its own head
    assert all(torch.equal(B_new[m], torch.zeros_like(B_new[m])) for m in B_new)  # never sampled: B = 0
    assert all(torch.equal(head_new[n], head0[n]) for n in head_new)  # and the initial head
    assert not torch.equal(states.get(0)["B"][next(iter(fm.shapes))], kept["B"][next(iter(fm.shapes))])


class StopAfter(Reporter):
    """Raises after round ``n`` was checkpointed (as a kill would leave the run)."""

    def __init__(self, n):
        self.n = n

    def round_end(self, row):
        if row["round"] == self.n:
            raise KeyboardInterrupt


def _rows(rows):
    return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]


def test_a_fedsa_run_reports_personal_accuracy_and_resumes_identically(tiny_args, tmp_path):
    extra = dict(strategy="fedsa", rounds=4, threads=1)
    ref = run(tiny_config(tiny_args, tmp_path / "ref", **extra))
    rows = ref.rows
    sampled = [set(r["clients"]) for r in rows]
    assert (sampled[0] | sampled[1]) & (sampled[2] | sampled[3])  # after the cut, a client with kept state returns
    held = setup(tiny_config(tiny_args, tmp_path / "s", **extra)).holdout
    for r in rows:
        assert 0 <= r["personal_accuracy"] <= 1 and 0 <= r["accuracy"] <= 1
        # every client with held-out examples, sampled or not (a never-sampled one: B = 0, the initial head)
        assert set(r["client_personal_accuracy"]) == {str(k) for k, h in enumerate(held) if h}
        assert r["personal_examples"] == sum(map(len, held))
        assert r["personal_accuracy"] == pytest.approx(
            sum(r["client_personal_accuracy"][str(k)] * len(h) for k, h in enumerate(held) if h) / sum(map(len, held)))
        # only A travels: tiny BERT, 2 layers x (query, value), k = 32, float32
        assert r["uplink_bytes"] == r["downlink_bytes"] == sum(4 * rk * 32 * 4 for rk in r["ranks"])
    state, saved = load_checkpoint(ref.out)
    kept = ClientStates.from_state_dict(saved["client_states"])
    assert set(kept.entries) == set().union(*sampled)
    assert all(torch.equal(g.B, torch.zeros_like(g.B)) for g in state.lora.values())  # the server holds no B

    # hlora eval / export read the same model the run scored: the mean of the clients' models
    assert Predictor(load_run(ref.out)).evaluate()["accuracy"] == pytest.approx(ref.summary["final_accuracy"])

    cfg = tiny_config(tiny_args, tmp_path / "cut", **extra)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, StopAfter(2))
    assert not (tmp_path / "cut" / "summary.json").exists()
    res = resume(tmp_path / "cut")
    assert _rows(res.rows) == _rows(rows)
    assert res.summary["final_accuracy"] == ref.summary["final_accuracy"]
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert _rows(lines) == _rows(rows)


def test_a_clients_own_model_is_what_its_personal_score_used_and_exports_to_peft(tiny_args, tmp_path, capsys):
    from hlora.data import encode
    from hlora.metrics import predict_logits
    from tests.test_cli import run_cli
    from tests.test_export_resume import peft_logits

    cfg = tiny_config(tiny_args, tmp_path / "run", strategy="fedsa", rounds=1, threads=1, seed=3)
    ref = run(cfg)
    last = ref.rows[-1]
    sampled, held = set(last["clients"]), setup(cfg).holdout
    for k, h in enumerate(held):
        if not h:
            continue
        trained = load_run(ref.out, client=k)
        assert trained.client == k and trained.trained == (k in sampled)
        p = Predictor(trained)
        assert p.evaluate(p.held_out())["accuracy"] == pytest.approx(last["client_personal_accuracy"][str(k)])
    k = sorted(sampled)[0]
    code, text = run_cli(["export", str(ref.out), "--client", str(k), "--out", str(tmp_path / "k")], capsys)
    assert code in (0, None) and "keeps 100.00%" in text
    p = Predictor(load_run(ref.out, client=k))
    dev = encode(p.tokenizer, p.task.dev, 48)
    ours = predict_logits(p.fm, p.adapter, p.run.head, dev, 16)
    torch.testing.assert_close(peft_logits(tmp_path / "k", cfg.model, dev), ours, rtol=1e-4, atol=1e-5)
    assert not torch.equal(ours, predict_logits(p.fm, load_run(ref.out).adapter, load_run(ref.out).head, dev, 16))
    code, text = run_cli(["eval", str(ref.out), "--client", str(k)], capsys)
    assert code in (0, None) and f"client {k} held-out" in text
    unsampled = sorted(set(range(len(held))) - sampled)
    if unsampled:
        code, text = run_cli(["predict", str(ref.out), "a", "b", "--client", str(unsampled[0])], capsys)
        assert code in (0, None) and "never sampled" in text
    code, text = run_cli(["eval", str(ref.out), "--client", "99"], capsys)
    assert code == 2 and "client id in 0..3" in text


def test_the_split_changes_only_for_a_personalised_strategy(tiny_args, tmp_path):
    hl = setup(tiny_config(tiny_args, tmp_path / "h", strategy="hlora"))
    whole = hl.cfg.client_parts(hl.task)
    assert hl.parts == whole and hl.holdout is None
    assert [c.num_examples for c in hl.clients] == [len(p) for p in whole]
    fs = setup(tiny_config(tiny_args, tmp_path / "f", strategy="fedsa", personal_holdout=0.25))
    for train, held, part, c in zip(fs.parts, fs.holdout, whole, fs.clients):
        assert sorted(train + held) == sorted(part) and not set(train) & set(held)
        n = len(part)
        assert len(held) == (0 if n < 2 else min(n - 1, max(1, round(0.25 * n)))) and c.num_examples == len(train)
    again, held_again = split_holdout(whole, 0.25, hl.cfg.seed)
    assert again == fs.parts and held_again == fs.holdout  # seeded
    tr, ho = split_holdout([[7], [1, 2]], 0.2, 0)  # one example: nothing held out; two: one
    assert ho[0] == [] and tr[0] == [7] and len(ho[1]) == 1 and sorted(tr[1] + ho[1]) == [1, 2]
    with pytest.raises(ConfigError, match="sends A only"):
        check_strategy(tiny_config(tiny_args, tmp_path / "x", strategy="fedsa", robust="normclip"))
    with pytest.raises(ConfigError, match="personal-holdout"):
        tiny_config(tiny_args, tmp_path / "x", strategy="fedsa", personal_holdout=1.0).validate()


def test_personal_eval_scores_a_global_strategy_on_fedsas_held_out_shares(tiny_args, tmp_path):
    """--personal-eval: a global strategy trains on what fedsa trains on (the same seeded split), and each
    round's personal scores are the global model's accuracy on each client's held-out share (checked against
    the saved run's model, scored on those examples by hlora eval's path)."""
    extra = dict(strategy="hlora", rounds=2, threads=1, personal_eval=True)
    ref = run(tiny_config(tiny_args, tmp_path / "run", **extra))
    exp = setup(tiny_config(tiny_args, tmp_path / "s", **extra))
    fedsa = setup(tiny_config(tiny_args, tmp_path / "f", strategy="fedsa"))
    assert exp.parts == fedsa.parts and exp.holdout == fedsa.holdout
    assert [c.num_examples for c in exp.clients] == [len(p) for p in exp.parts]
    last = ref.rows[-1]
    assert last["personal_examples"] == sum(map(len, exp.holdout))
    p = Predictor(load_run(ref.out))
    for k, held in enumerate(exp.holdout):
        if held:
            got = p.evaluate(p.task.train.subset(held))["accuracy"]
            assert got == pytest.approx(last["client_personal_accuracy"][str(k)])
    assert p.evaluate()["accuracy"] == pytest.approx(ref.summary["final_accuracy"])  # the dev score is unchanged
    # the baseline: each client's own majority label on its held-out share, by hand
    labels, right = exp.task.train.labels, 0
    for train, held in zip(exp.parts, exp.holdout):
        fed = [sum(labels[i] == c for t in exp.parts for i in t) for c in (0, 1)]
        own = [sum(labels[i] == c for i in train) for c in (0, 1)]
        major = 0 if own[0] > own[1] or (own[0] == own[1] and fed[0] > fed[1]) else 1
        right += sum(labels[i] == major for i in held)
    assert ref.summary["personal_majority"] == pytest.approx(right / sum(map(len, exp.holdout)))
    # with the client's own label prior added (its training offset), from the saved model by hand
    from hlora.data import encode
    from hlora.metrics import predict_logits
    from hlora.objectives import label_counts, offset_from_counts

    fed = label_counts(labels, 2)
    right = 0
    for train, held in zip(exp.parts, exp.holdout):
        if held:
            data = encode(p.tokenizer, p.task.train.subset(held), 48)
            logits = predict_logits(p.fm, p.adapter, p.run.head, data, 16)
            prior = offset_from_counts(label_counts([labels[i] for i in train], 2), fed, 1.0)
            right += int(((logits + prior).argmax(-1) == data.labels).sum())
    assert last["personal_accuracy_prior"] == pytest.approx(right / sum(map(len, exp.holdout)))
    plain = run(tiny_config(tiny_args, tmp_path / "plain", strategy="hlora", rounds=1, threads=1))
    assert "personal_accuracy" not in plain.rows[-1]
    with pytest.raises(ConfigError, match="--task instruct has none"):
        tiny_config(tiny_args, tmp_path / "lm", personal_eval=True, task="instruct").validate()


def test_flower_refuses_what_fedsa_cannot_do_there_in_one_line(tmp_path):
    """fedsa runs on Flower (tests/test_flower.py); a resumed run (its nodes' kept B is in the stopped run's
    Flower run state, which a new run does not have), evaluate-on clients or both (no global model) and
    --robust (the server sees A only) are refused, each in one line, before anything loads."""
    from hlora.engine.flower.server_app import run_federation

    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "config.yaml").write_text("strategy: fedsa\n")
    (stopped / "flower.json").write_text(json.dumps({"run_config": {"strategy": "fedsa"}}))
    for run_config, match in [
        ({"resume": str(stopped)}, "restart from B = 0"),
        ({"strategy": "fedsa", "evaluate-on": "both"}, "no global model"),
        ({"strategy": "fedsa", "evaluate-on": "clients"}, "no global model"),
        ({"strategy": "fedsa", "robust": "krum"}, "sends A only"),
    ]:
        with pytest.raises(ConfigError, match=match) as e:
            run_federation(None, run_config)
        assert "\n" not in str(e.value)
