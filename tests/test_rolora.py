"""RoLoRA (hlora.strategies.rolora) against dense float64 references, and the train_B flag end to end."""

import torch

from hlora import run
from hlora.checkpoint import load_checkpoint
from hlora.engine.flower.records import TrainSettings, payload_to_record, record_to_payload
from hlora.factors import Factor
from hlora.model import FederatedModel, load_classifier
from hlora.strategies import Update
from tests.test_flower_records import wire
from tests.test_run import tiny_config
from tests.test_strategies import D, K, R, global_delta, spec, state_for, trained_updates

HEAD = 3 * 8


def test_rounds_alternate_and_the_average_is_the_exact_average_of_the_clients_updates():
    s, state = state_for("rolora")
    specs = [spec(0, 3, n=1), spec(1, 8, alpha=8.0, n=3), spec(2, 5, alpha=32.0, n=2)]
    p = [1 / 6, 3 / 6, 2 / 6]
    for rnd in range(1, 5):
        before = s.global_adapter(state)["m"]
        b_round = rnd % 2 == 1  # round 1 trains B (LoRA's B = 0 gives A no gradient)
        ups = trained_updates(s, state, specs, seed=rnd)
        for c, u in zip(specs, ups):
            pl = s.dispatch(state, c, torch.Generator())
            assert (pl.train_B, pl.train_A) == (b_round, not b_round)
            f, r = pl.lora["m"], c.ranks["m"]
            frozen, g_frozen = (f.A, before.A[:r]) if b_round else (f.B, before.B[:, :r])
            assert torch.equal(frozen, g_frozen)  # the frozen factor is the global one, bit for bit
            torch.testing.assert_close(f.delta(), before.B[:, :r] @ before.A[:r])  # the truncated start
            # only the trained factor travels back
            assert s.uplink_bytes(u) == r * (D if b_round else K) * 8 + HEAD
            assert s.downlink_bytes(state, pl) == r * (D + K) * 8 + HEAD
        new = s.aggregate(state, ups)
        want = sum(pk * u.lora["m"].delta() for pk, u in zip(p, ups))
        torch.testing.assert_close(global_delta(s, new), want, rtol=1e-10, atol=1e-10)
        after = s.global_adapter(new)["m"]
        if b_round:  # A unchanged (the rank-8 client holds every rank: no row is reset)
            assert torch.equal(after.A, before.A)
        else:
            assert torch.equal(after.B, before.B)
        state = new


def test_a_rank_no_client_holds_gets_no_weight_and_can_train_again():
    s, state = state_for("rolora")
    specs = [spec(0, 2), spec(1, 4)]
    for rnd in range(2):  # B round, then A round, both without ranks 5..8
        state = s.aggregate(state, trained_updates(s, state, specs, seed=rnd))
    g = s.global_adapter(state)["m"]
    assert torch.equal(g.B[:, 4:], torch.zeros(D, R - 4, dtype=torch.float64))
    # their rows of A are the shared initialisation again (not zero), so a B round can train them
    assert torch.equal(g.A[4:], state.init["m"].A[4:])
    ups = trained_updates(s, state, [spec(2, R)], seed=5)
    new = s.global_adapter(s.aggregate(state, ups))["m"]
    assert new.B[:, 4:].abs().min() > 0


def test_train_B_false_freezes_B_in_the_model_and_crosses_the_flower_wire(tiny_model):
    model, _ = load_classifier(tiny_model, 2, seed=0)
    fm = FederatedModel(model)
    lora = {n: Factor(torch.randn(d, 2), torch.randn(2, k), 4.0) for n, (d, k) in fm.shapes.items()}
    params = fm.install(lora, fm.head_state(), train_B=False)
    adapters = [p for layer in fm.layers.values() for p in (layer.lora_A, layer.lora_B)]
    assert [id(p) for p in params[: len(fm.layers)]] == [id(layer.lora_A) for layer in fm.layers.values()]
    assert sum(p.requires_grad for p in adapters) == len(fm.layers)  # A trains, B does not
    fm.clear()

    s, state = state_for("rolora")
    state = s.aggregate(state, trained_updates(s, state, [spec(0, 4)]))  # round 2: an A round
    payload = s.dispatch(state, spec(0, 4), torch.Generator())
    assert not payload.train_B and payload.train_A
    got, _ = record_to_payload(wire(payload_to_record(payload, TrainSettings(0, 2, 0, 1, 1e-3, 8))))
    assert (got.train_A, got.train_B) == (True, False) and got.info == {"trains": "A"}


def test_a_message_from_before_train_B_reads_as_trainable():
    s, state = state_for("rolora")
    payload = s.dispatch(state, spec(0, 4), torch.Generator())
    record = payload_to_record(payload, TrainSettings(0, 1, 0, 1, 1e-3, 8))
    del record.config_records["config"]["train-B"]
    got, _ = record_to_payload(record)
    assert got.train_B


def test_update_keeps_the_factor_it_did_not_train():
    """The server averages only the trained factor: a changed frozen factor does not leak in."""
    s, state = state_for("rolora")
    (u,) = trained_updates(s, state, [spec(0, R)])
    tampered = Update(0, {"m": Factor(u.lora["m"].B, u.lora["m"].A + 1.0, u.lora["m"].scale)}, u.head, 1,
                      dict(u.info))
    torch.testing.assert_close(global_delta(s, s.aggregate(state, [tampered])),
                               u.lora["m"].scale * u.lora["m"].B @ state.init["m"].A)


def test_a_real_B_round_leaves_A_as_it_was_and_uploads_B_only(tiny_args, tmp_path):
    res = run(tiny_config(tiny_args, tmp_path / "r", strategy="rolora", rounds=1, ranks="3"))
    state, _ = load_checkpoint(res.out)
    assert all(torch.equal(g.A, state.init[m].A) for m, g in state.lora.items())
    assert all(g.B.abs().max() > 0 for g in state.lora.values())
    # tiny BERT: 2 layers x (query, value), 32 x 32, rank 3; head 2 x 32 + 2; float32; 2 clients a round
    head = (2 * 32 + 2) * 4
    assert res.rows[0]["uplink_bytes"] == 2 * (4 * 3 * 32 * 4 + head)
    assert res.rows[0]["downlink_bytes"] == 2 * (4 * 3 * 64 * 4 + head)
