"""FedEx-LoRA (hlora.strategies.fedex) against dense float64 references."""

import torch

from hlora.checkpoint import load_checkpoint, save_checkpoint
from tests.test_cli import run_cli
from tests.test_strategies import D, K, R, global_delta, padded_average, spec, state_for, trained_updates

HEAD = 3 * 8  # the tests' head: 3 float64


def client_models(payloads, updates):
    """Each client's trained model minus W0, dense: its frozen branch plus its own LoRA."""
    return [pl.frozen["m"].delta() + u.lora["m"].delta() for pl, u in zip(payloads, updates)]


def run_round(s, state, specs, seed):
    payloads = [s.dispatch(state, c, torch.Generator().manual_seed(seed + c.id)) for c in specs]
    updates = trained_updates(s, state, specs, seed=seed)
    return payloads, updates, s.aggregate(state, updates)


def test_every_client_starts_from_the_global_model_and_the_global_model_is_the_exact_average():
    s, state = state_for("fedex")
    specs = [spec(0, 2, n=1), spec(1, 5, alpha=8.0, n=3), spec(2, 8, alpha=32.0, n=2)]
    p = [1 / 6, 3 / 6, 2 / 6]
    for rnd in range(3):
        glob = global_delta(s, state)
        payloads, updates, new = run_round(s, state, specs, seed=10 * rnd)
        for pl, c in zip(payloads, specs):
            start = pl.lora["m"].delta() + pl.frozen["m"].delta()
            torch.testing.assert_close(start, glob, rtol=1e-10, atol=1e-10)
            assert pl.lora["m"].rank == c.ranks["m"]
        want = sum(pk * m for pk, m in zip(p, client_models(payloads, updates)))
        torch.testing.assert_close(global_delta(s, new), want, rtol=1e-10, atol=1e-10)
        # the factors are HetLoRA's zero-padded averages (every rank is held by the rank-8 client)
        B_ref, A_ref = padded_average(updates, p)
        torch.testing.assert_close(new.lora["m"].B, B_ref)
        torch.testing.assert_close(new.lora["m"].A, A_ref)
        assert new.extra["residual"]["m"].rank <= min(D, K)
        state = new


def test_equal_ranks_give_the_papers_error_term():
    s, state = state_for("fedex")
    specs = [spec(0, R, n=1), spec(1, R, n=3)]
    _, updates, new = run_round(s, state, specs, seed=0)
    f0, f1 = updates[0].lora["m"], updates[1].lora["m"]
    sc = f0.scale
    B_bar, A_bar = 0.25 * f0.B + 0.75 * f1.B, 0.25 * f0.A + 0.75 * f1.A
    error = 0.25 * f0.delta() + 0.75 * f1.delta() - sc * B_bar @ A_bar
    torch.testing.assert_close(new.extra["residual"]["m"].dense(), error, rtol=1e-10, atol=1e-10)
    assert error.abs().max() > 1e-3  # FedAvg of the factors alone is biased


def test_a_single_client_leaves_no_error_term():
    s, state = state_for("fedex")
    for rnd in range(2):
        _, _, state = run_round(s, state, [spec(0, R)], seed=rnd)
        assert state.extra["residual"]["m"].rank == 0  # the cancellation is dropped, not kept as noise


def test_bytes_count_the_factors_the_missed_error_terms_and_the_head():
    s, state = state_for("fedex")
    specs = [spec(0, 2, n=1), spec(1, 5, n=3)]
    pl = s.dispatch(state, specs[0], torch.Generator())
    assert s.downlink_bytes(state, pl) == R * (D + K) * 8 + HEAD  # no error term yet
    sent = []
    for rnd in range(3):
        _, updates, state = run_round(s, state, specs, seed=rnd)
        if rnd == 0:  # two clients: the error is p0 p1 [B_0 - B_1][s_0 A_0 - s_1 A_1] (padded), rank 5
            pl = s.dispatch(state, spec(9, 3), torch.Generator())
            assert state.extra["residual"]["m"].rank == 5
            assert s.downlink_bytes(state, pl) == R * (D + K) * 8 + 5 * (D + 1 + K) * 8 + HEAD
        assert s.uplink_bytes(updates[0]) == 2 * (D + K) * 8 + HEAD
        # the round's error term as stacked factors: the clients' (2 + 5), the tails (R: the rank-2 and
        # rank-5 clients leave tails), and (B', -A') (R)
        sent.append((2 + 5 + R + R) * (D + K) * 8)
    assert state.extra["stacked_bytes"] == {1: sent[0], 2: sent[1], 3: sent[2]}
    # a client of the last round missed only the last error term; one that never took part needs all
    # three; either may take the whole residual instead, when that is smaller: its thin SVD or, past rank
    # D K / (D + K + 1), the dense D x K matrix
    E = state.extra["residual"]["m"]
    merged = min(E.rank * (D + 1 + K), D * K) * 8
    pl = s.dispatch(state, specs[0], torch.Generator())
    assert s.downlink_bytes(state, pl) == R * (D + K) * 8 + min(sent[2], merged) + HEAD
    late = s.dispatch(state, spec(9, 3), torch.Generator())
    assert s.downlink_bytes(state, late) == R * (D + K) * 8 + min(sum(sent), merged) + HEAD
    # here the residual saturates near rank min(D, K), where the dense matrix is the cheaper form
    assert merged == D * K * 8 < sum(sent)


def test_the_error_term_survives_a_checkpoint(tmp_path):
    s, state = state_for("fedex")
    _, _, state = run_round(s, state, [spec(0, 3), spec(1, 6)], seed=0)
    save_checkpoint(tmp_path, state)
    back, _ = load_checkpoint(tmp_path)
    torch.testing.assert_close(global_delta(s, back), global_delta(s, state), rtol=0, atol=0)
    for key in ("synced", "stacked_bytes"):
        assert back.extra[key] == state.extra[key]


def test_a_server_optimizer_is_refused_in_one_line(capsys, tmp_path):
    code, text = run_cli(["run", "--strategy", "fedex", "--server-opt", "avgm", "--server-lr", "2",
                          "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and len(text.strip().splitlines()) == 1
    assert "--server-opt avgm is not defined for fedex; use avg" in " ".join(text.split())
