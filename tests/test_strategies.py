"""Every strategy's server rule, as pure tensor tests against dense references."""

import pytest
import torch

from hlora.factors import Factor, init_factors
from hlora.strategies import ClientSpec, StrategyError, Update, get_strategy, names
from hlora.strategies.flora import stack_factors
from hlora.strategies.hetlora import norm_weights, product_norm

D, K, R = 20, 16, 8


def make_init(rank=R):
    init = init_factors({"m": (D, K)}, rank, torch.Generator().manual_seed(0))
    return {m: Factor(f.B.double(), f.A.double(), 1.0) for m, f in init.items()}


def state_for(name, rank=R, **opts):
    s = get_strategy(name, **opts)
    return s, s.init_state(make_init(rank), {"h": torch.zeros(3, dtype=torch.float64)})


def random_factor(r, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    return Factor(torch.randn(D, r, generator=g, dtype=torch.float64),
                  torch.randn(r, K, generator=g, dtype=torch.float64), alpha / r)


def spec(i, r, alpha=16.0, n=10):
    return ClientSpec(i, {"m": r}, alpha, n)


def trained_updates(strategy, state, specs, seed=0):
    """Dispatch to each client, then 'train': perturb its trainable factors (keeping what is frozen)."""
    return [local_update(strategy.dispatch(state, c, torch.Generator().manual_seed(seed + c.id)), c, seed)
            for c in specs]


def local_update(payload, c, seed):
    """Client c's 'training' of its payload: Gaussian steps on the trainable factors, a head of its id."""
    g = torch.Generator().manual_seed(100 + seed + c.id)
    out = {}
    for m, f in payload.lora.items():
        B = f.B if not payload.train_B else f.B + torch.randn(f.B.shape, generator=g, dtype=f.B.dtype)
        A = f.A if not payload.train_A else f.A + torch.randn(f.A.shape, generator=g, dtype=f.A.dtype)
        out[m] = Factor(B, A, f.scale)
    head = {"h": torch.full((3,), float(c.id), dtype=torch.float64)}
    return Update(c.id, out, head, c.num_examples, dict(payload.info))


def padded_average(updates, weights):
    """Dense reference of FedAvg of the factors at scaling 1, zero-padded to R:
    B = sum_k w_k [B_k, 0], A = sum_k w_k [s_k A_k; 0]."""
    fs = [u.lora["m"] for u in updates]
    B = sum(w * torch.nn.functional.pad(f.B, (0, R - f.rank)) for f, w in zip(fs, weights))
    A = sum(w * f.scale * torch.nn.functional.pad(f.A, (0, 0, 0, R - f.rank)) for f, w in zip(fs, weights))
    return B, A


def global_delta(strategy, state):
    return sum(f.delta() for f in strategy.global_adapter(state).values())


def test_every_strategy_is_registered():
    assert set(names()) == {"centralized", "fedex", "fedit", "fedplora", "fedsa", "ffa", "flexlora", "flora",
                            "hetlora", "hlora", "lorafair", "rolora"}


@pytest.mark.parametrize("name", ["hlora", "flexlora", "fedit", "hetlora", "ffa", "fedplora", "flora",
                                  "fedex", "rolora", "lorafair"])
def test_single_client_of_rank_r_gets_its_own_update(name):
    """With one client, the global update is that client's own update, whatever the method."""
    r = R if name in ("fedit", "fedplora") else 5  # fedplora: a client of rank R trains every module
    s, state = state_for(name)
    (u,) = trained_updates(s, state, [spec(0, r)])
    new = s.aggregate(state, [u])
    torch.testing.assert_close(global_delta(s, new), u.lora["m"].delta(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(new.head["h"], u.head["h"])


def test_fedit_refuses_mixed_ranks_with_a_clear_error():
    with pytest.raises(StrategyError, match="equal ranks only.*--ranks"):
        get_strategy("fedit").check([spec(0, 2), spec(1, 8)])
    get_strategy("fedit").check([spec(0, 8), spec(1, 8)])


def test_fedit_is_the_naive_average_of_factors():
    s, state = state_for("fedit")
    ups = trained_updates(s, state, [spec(0, R, n=1), spec(1, R, n=3)])
    new = s.global_adapter(s.aggregate(state, ups))["m"]
    sc = ups[0].lora["m"].scale
    B = 0.25 * ups[0].lora["m"].B + 0.75 * ups[1].lora["m"].B
    A = 0.25 * ups[0].lora["m"].A + 0.75 * ups[1].lora["m"].A
    torch.testing.assert_close(new.delta(), sc * B @ A)
    mean_of_products = 0.25 * ups[0].lora["m"].delta() + 0.75 * ups[1].lora["m"].delta()
    assert not torch.allclose(new.delta(), mean_of_products, atol=1e-3)  # biased (eq. 1)


def test_hetlora_zero_pad_then_truncate_round_trips_a_single_client():
    s, state = state_for("hetlora")
    (u,) = trained_updates(s, state, [spec(0, 3, alpha=12.0)])
    new = s.aggregate(state, [u])
    back = s.dispatch(new, spec(0, 3, alpha=12.0), torch.Generator()).lora["m"]
    torch.testing.assert_close(back.B, u.lora["m"].B)
    torch.testing.assert_close(back.A, u.lora["m"].A)
    assert back.scale == u.lora["m"].scale


def test_hetlora_zero_padded_average_and_truncation():
    s, state = state_for("hetlora")
    ups = trained_updates(s, state, [spec(0, 2, n=1), spec(1, 6, n=1)])
    g = s.global_adapter(s.aggregate(state, ups))["m"]
    f0, f1 = ups[0].lora["m"], ups[1].lora["m"]
    B_ref = torch.zeros(D, R, dtype=torch.float64)
    B_ref[:, :2] += 0.5 * f0.B
    B_ref[:, :6] += 0.5 * f1.B
    torch.testing.assert_close(g.B, B_ref)
    A_ref = torch.zeros(R, K, dtype=torch.float64)
    A_ref[:2] += 0.5 * f0.scale * f0.A
    A_ref[:6] += 0.5 * f1.scale * f1.A
    torch.testing.assert_close(g.A[:6], A_ref[:6])
    # ranks 7 and 8, which no client of the round holds, keep their previous value (not zero)
    torch.testing.assert_close(g.A[6:], state.init["m"].A[6:])
    assert torch.equal(g.B[:, 6:], torch.zeros(D, 2, dtype=torch.float64))


def test_hetlora_norm_weights():
    f_small, f_big = random_factor(2, 4.0, 1), random_factor(4, 4.0, 2)
    f_big = Factor(10 * f_big.B, f_big.A, f_big.scale)
    assert product_norm(f_small) == pytest.approx(float(torch.linalg.matrix_norm(f_small.delta())))
    w = norm_weights([f_small, f_big])
    assert sum(w) == pytest.approx(1.0) and w[1] > 0.8
    s, state = state_for("hetlora", norm_weights=True)
    ups = trained_updates(s, state, [spec(0, 2, n=1), spec(1, 6, n=1000)])
    w = norm_weights([u.lora["m"] for u in ups])  # the example counts play no part
    g = s.global_adapter(s.aggregate(state, ups))["m"]
    f0, f1 = ups[0].lora["m"], ups[1].lora["m"]
    B_ref = torch.zeros(D, R, dtype=torch.float64)
    B_ref[:, :2] += w[0] * f0.B
    B_ref[:, :6] += w[1] * f1.B
    torch.testing.assert_close(g.B[:, :6], B_ref[:, :6])


def test_flora_stacked_product_is_the_exact_weighted_sum():
    facs = [random_factor(r, a, i) for i, (r, a) in enumerate([(2, 16), (7, 8), (4, 32)])]
    p = [0.2, 0.5, 0.3]
    st = stack_factors(facs, p)
    assert st.rank == 13
    torch.testing.assert_close(st.B @ st.A, sum(pk * f.delta() for pk, f in zip(p, facs)), rtol=1e-10, atol=1e-10)


def test_flora_merges_rounds_and_restarts_a_fresh_lora():
    s, state = state_for("flora")
    total = torch.zeros(D, K, dtype=torch.float64)
    for rnd in range(3):
        specs = [spec(0, 2, n=1), spec(1, 5, n=3)]
        payloads = [s.dispatch(state, c, torch.Generator().manual_seed(rnd)) for c in specs]
        for pl in payloads:  # each client starts a fresh LoRA (B = 0) on top of the merged total
            assert pl.lora["m"].B.abs().max() == 0
            torch.testing.assert_close(pl.frozen["m"].delta(), total)
            assert rnd > 0 or total.abs().max() == 0
        ups = trained_updates(s, state, specs, seed=rnd)
        total = total + 0.25 * ups[0].lora["m"].delta() + 0.75 * ups[1].lora["m"].delta()
        state = s.aggregate(state, ups)
        torch.testing.assert_close(global_delta(s, state), total, rtol=1e-9, atol=1e-9)
    # the download is the last round's stacked factors: (2 + 5) * (D + K) floats, plus the head
    pl = s.dispatch(state, spec(0, 2), torch.Generator())
    assert s.downlink_bytes(state, pl) == 7 * (D + K) * 8 + 3 * 8
    # a client that missed every round needs all three stacks (21 ranks), or the merged update when that
    # is smaller: its thin SVD or, here at full rank 16, the dense D x K matrix
    late = s.dispatch(state, spec(9, 2), torch.Generator())
    merged = global_delta(s, state)
    rank = int(torch.linalg.matrix_rank(merged))
    assert rank == min(D, K)
    expected = min(21 * (D + K), rank * (D + 1 + K), D * K)
    assert expected == D * K  # the dense form is the cheapest at full rank
    assert s.downlink_bytes(state, late) == expected * 8 + 3 * 8


def test_ffa_A_is_bit_identical_on_every_client_and_round():
    s, state = state_for("ffa")
    A0 = state.init["m"].A.clone()
    for rnd in range(3):
        specs = [spec(0, 3), spec(1, 8), spec(2, 5, alpha=4.0)]
        for c in specs:
            pl = s.dispatch(state, c, torch.Generator())
            assert not pl.train_A
            assert torch.equal(pl.lora["m"].A, A0[: c.ranks["m"]])
        ups = trained_updates(s, state, specs, seed=rnd)
        state = s.aggregate(state, ups)
        assert torch.equal(s.global_adapter(state)["m"].A, A0)
        # A frozen: averaging B is averaging the updates (with equal-rank clients)
    s2, st2 = state_for("ffa")
    ups = trained_updates(s2, st2, [spec(0, 8, n=1), spec(1, 8, n=2)])
    ref = (ups[0].lora["m"].delta() + 2 * ups[1].lora["m"].delta()) / 3
    torch.testing.assert_close(global_delta(s2, s2.aggregate(st2, ups)), ref)
    assert s2.uplink_bytes(ups[0]) == (D * 8 + 3) * 8  # B and the head only


def test_fedplora_client_start_equals_the_global_model_exactly():
    s, state = state_for("fedplora")
    ups = trained_updates(s, state, [spec(0, 8), spec(1, 8)])
    state = s.aggregate(state, ups)
    glob = global_delta(s, state)
    for c in [spec(2, 3), spec(3, 1), spec(4, 8, alpha=5.0)]:
        pl = s.dispatch(state, c, torch.Generator().manual_seed(c.id))
        start = pl.lora["m"].delta() + pl.frozen["m"].delta()
        torch.testing.assert_close(start, glob, rtol=1e-12, atol=1e-12)
        assert pl.lora["m"].rank == c.ranks["m"] and pl.frozen["m"].rank == R - c.ranks["m"]
        # it downloads all R modules and uploads its picks with their indices
        assert s.downlink_bytes(state, pl) == R * (D + K) * 8 + 3 * 8


def test_fedplora_with_all_ranks_R_reduces_to_fedit():
    specs = [spec(0, R, n=1), spec(1, R, n=3), spec(2, R, n=2)]
    fp, st_fp = state_for("fedplora")
    fi, st_fi = state_for("fedit")
    for rnd in range(2):
        ups_fp = trained_updates(fp, st_fp, specs, seed=rnd)
        ups_fi = trained_updates(fi, st_fi, specs, seed=rnd)
        for a, b in zip(ups_fp, ups_fi):
            assert torch.equal(a.info["indices"]["m"], torch.arange(R))
            torch.testing.assert_close(a.lora["m"].B, b.lora["m"].B)
        st_fp, st_fi = fp.aggregate(st_fp, ups_fp), fi.aggregate(st_fi, ups_fi)
        torch.testing.assert_close(global_delta(fp, st_fp), global_delta(fi, st_fi))


def test_fedplora_module_nobody_selected_is_unchanged_and_others_are_averaged():
    s, state = state_for("fedplora")
    state = s.aggregate(state, trained_updates(s, state, [spec(0, R)]))  # give every module a value
    before = s.global_adapter(state)["m"]
    ups = trained_updates(s, state, [spec(1, 2, n=1), spec(2, 3, n=3)])
    picked = set(ups[0].info["indices"]["m"].tolist()) | set(ups[1].info["indices"]["m"].tolist())
    after = s.global_adapter(s.aggregate(state, ups))["m"]
    for j in range(R):
        if j not in picked:
            assert torch.equal(after.B[:, j], before.B[:, j]) and torch.equal(after.A[j], before.A[j])
        else:
            contrib = [(u, (u.info["indices"]["m"] == j).nonzero()) for u in ups]
            contrib = [(u, int(pos)) for u, pos in contrib if pos.numel()]
            n = sum(u.num_examples for u, _ in contrib)
            b = sum(u.num_examples / n * u.lora["m"].B[:, pos] for u, pos in contrib)
            a = sum(u.num_examples / n * u.lora["m"].scale * u.lora["m"].A[pos] for u, pos in contrib)
            torch.testing.assert_close(after.B[:, j], b)
            torch.testing.assert_close(after.A[j], a)
    assert len(picked) < R  # with 2 + 3 picks of 8 some module is left out
    assert s.uplink_bytes(ups[0]) == 2 * (D + K) * 8 + 3 * 8 + 2 * 8  # picks, head, int64 indices


def test_centralized_keeps_the_single_learner_update():
    s, state = state_for("centralized")
    (u,) = trained_updates(s, state, [spec(-1, R)])
    new = s.aggregate(state, [u])
    torch.testing.assert_close(global_delta(s, new), u.lora["m"].delta())
    pl = s.dispatch(new, spec(-1, R), torch.Generator())
    torch.testing.assert_close(pl.lora["m"].delta(), u.lora["m"].delta())
    assert s.uplink_bytes(u) == 0 and s.downlink_bytes(new, pl) == 0


@pytest.mark.parametrize("name", ["hlora", "flexlora", "hetlora", "fedit"])
def test_bytes_are_the_rank_r_factors_and_the_head(name):
    r = R if name == "fedit" else 3
    s, state = state_for(name)
    ups = trained_updates(s, state, [spec(0, r), spec(1, r)])
    state = s.aggregate(state, ups)
    pl = s.dispatch(state, spec(0, r), torch.Generator())
    expected = (r * (D + K) + 3) * 8  # float64 in these tests
    assert s.downlink_bytes(state, pl) == expected
    assert s.uplink_bytes(ups[0]) == expected


def test_hetlora_self_pruning_drops_a_weak_tail_rank():
    s, state = state_for("hetlora", prune=True, prune_threshold=0.1)
    pl = s.dispatch(state, spec(0, 4), torch.Generator())
    assert pl.tail_penalty == pytest.approx(1e-3)  # the client regularises its last rank
    strong, weak = random_factor(4, 16.0, 1), random_factor(4, 16.0, 2)
    weak.B[:, -1] *= 1e-4  # its last rank carries almost nothing
    ups = [Update(0, {"m": strong}, {"h": torch.zeros(3, dtype=torch.float64)}, 1),
           Update(1, {"m": weak}, {"h": torch.zeros(3, dtype=torch.float64)}, 1)]
    new = s.aggregate(state, ups)
    assert new.extra["pruned"] == {1: 3}
    assert s.dispatch(new, spec(1, 4), torch.Generator()).lora["m"].rank == 3
    assert s.dispatch(new, spec(0, 4), torch.Generator()).lora["m"].rank == 4
    # the pruned client's update entered the average without its last rank
    fedavg = 0.5 * zero_pad_B(strong) + 0.5 * zero_pad_B(Factor(weak.B[:, :3], weak.A[:3], weak.scale))
    torch.testing.assert_close(s.global_adapter(new)["m"].B[:, :4], fedavg[:, :4])
    off, st = state_for("hetlora")
    assert off.dispatch(st, spec(0, 4), torch.Generator()).tail_penalty == 0.0


def zero_pad_B(f):
    out = torch.zeros(D, R, dtype=torch.float64)
    out[:, : f.rank] = f.B
    return out
