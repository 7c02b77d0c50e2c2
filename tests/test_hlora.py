"""HLoRA (and FlexLoRA, its sibling) against dense references."""

import pytest
import torch

from hlora.factors import Factor, init_factors
from hlora.strategies import ClientSpec, Update, get_strategy
from hlora.strategies.hlora import aggregate_products

D, K = 24, 18


def client_factor(r, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    return Factor(torch.randn(D, r, generator=g, dtype=torch.float64),
                  torch.randn(r, K, generator=g, dtype=torch.float64), alpha / r)


def setup(ranks, alphas, sizes):
    facs = [client_factor(r, a, seed=i) for i, (r, a) in enumerate(zip(ranks, alphas))]
    updates = [Update(i, {"m": f}, {"h": torch.full((2,), float(i), dtype=torch.float64)}, n)
               for i, (f, n) in enumerate(zip(facs, sizes))]
    p = [n / sum(sizes) for n in sizes]
    dense = sum(pk * f.scale * f.B @ f.A for pk, f in zip(p, facs))
    return facs, updates, p, dense


def init_state(strategy, rank):
    init = {k: Factor(f.B.double(), f.A.double(), 1.0)
            for k, f in init_factors({"m": (D, K)}, rank, torch.Generator().manual_seed(0)).items()}
    return strategy.init_state(init, {"h": torch.zeros(2, dtype=torch.float64)})


@pytest.mark.parametrize("name", ["hlora", "flexlora"])
def test_aggregate_is_the_weighted_sum_of_scaled_products(name):
    ranks, alphas, sizes = [2, 5, 8, 3], [16, 16, 8, 32], [10, 40, 25, 5]
    _, updates, p, dense = setup(ranks, alphas, sizes)
    s = get_strategy(name)
    state = s.aggregate(init_state(s, 8), updates)
    g = s.global_adapter(state)["m"]
    torch.testing.assert_close(g.delta(), dense, rtol=1e-9, atol=1e-9)
    # the head is the n_k-weighted average
    torch.testing.assert_close(state.head["h"], torch.full((2,), sum(pk * i for i, pk in enumerate(p)),
                                                           dtype=torch.float64))


@pytest.mark.parametrize("name", ["hlora", "flexlora"])
def test_each_client_receives_its_best_rank_r_approximation(name):
    ranks, alphas, sizes = [2, 5, 8, 3], [16, 16, 8, 32], [10, 40, 25, 5]
    _, updates, _, dense = setup(ranks, alphas, sizes)
    s = get_strategy(name)
    state = s.aggregate(init_state(s, 8), updates)
    U, S, Vt = torch.linalg.svd(dense, full_matrices=False)
    for r, alpha in [(1, 16.0), (2, 16.0), (4, 8.0), (8, 16.0)]:
        f = s.dispatch(state, ClientSpec(0, {"m": r}, alpha, 10), torch.Generator()).lora["m"]
        assert f.B.shape == (D, r) and f.A.shape == (r, K)
        assert f.scale == pytest.approx(alpha / r)
        best = (U[:, :r] * S[:r]) @ Vt[:r]
        torch.testing.assert_close(f.delta(), best, rtol=1e-8, atol=1e-8)
        # Eckart-Young: the error is the norm of the discarded singular values
        err = torch.linalg.matrix_norm(dense - f.delta())
        assert float(err) == pytest.approx(float(S[r:].norm()), rel=1e-8)


def test_hlora_and_flexlora_split_the_singular_values_differently():
    _, updates, _, _ = setup([4, 6], [16, 16], [1, 1])
    spec = ClientSpec(0, {"m": 4}, 16.0, 1)
    out = {}
    for name in ("hlora", "flexlora"):
        s = get_strategy(name)
        out[name] = s.dispatch(s.aggregate(init_state(s, 8), updates), spec, torch.Generator()).lora["m"]
    torch.testing.assert_close(out["hlora"].delta(), out["flexlora"].delta())
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(out["hlora"].B.T @ out["hlora"].B, eye)  # HLoRA: B = U_r orthonormal
    s_ = out["flexlora"].scale
    torch.testing.assert_close(s_ ** 2 * out["flexlora"].A @ out["flexlora"].A.T, eye)  # FlexLoRA: A = V_r^T / s
    assert not torch.allclose(out["hlora"].B, out["flexlora"].B)


def test_scaling_pitfall_raw_products_are_wrong_with_mixed_alpha_over_r():
    """PEFT applies (alpha/r) B A: summing raw B A across clients with different alpha/r is wrong."""
    facs, updates, p, dense = setup([2, 8], [16, 16], [1, 1])  # scales 8 and 2
    raw = sum(pk * f.B @ f.A for pk, f in zip(p, facs))
    ours = aggregate_products([u.lora["m"] for u in updates], p).dense()
    torch.testing.assert_close(ours, dense)
    assert not torch.allclose(ours, raw, rtol=1e-3, atol=1e-3)
    # and a mis-scaled server would fail the aggregation test above: raw differs from the truth
    assert torch.linalg.matrix_norm(raw - dense) > 0.1 * torch.linalg.matrix_norm(dense)


@pytest.mark.parametrize("name", ["hlora", "flexlora"])
def test_single_client_gets_its_own_update_back(name):
    facs, updates, _, _ = setup([5], [10], [7])
    s = get_strategy(name)
    state = s.aggregate(init_state(s, 8), updates)
    back = s.dispatch(state, ClientSpec(0, {"m": 5}, 10.0, 7), torch.Generator()).lora["m"]
    torch.testing.assert_close(back.delta(), facs[0].delta(), rtol=1e-9, atol=1e-9)


def test_naive_fedavg_of_factors_is_biased_and_hlora_is_not():
    """The paper's eq. (1): mean(B) mean(A) != mean(B A)."""
    facs, updates, p, dense = setup([4, 4, 4], [8, 8, 8], [1, 1, 1])
    s = facs[0].scale
    naive = s * sum(pk * f.B for pk, f in zip(p, facs)) @ sum(pk * f.A for pk, f in zip(p, facs))
    assert torch.linalg.matrix_norm(naive - dense) > 0.1 * torch.linalg.matrix_norm(dense)
    st = get_strategy("hlora")
    got = st.global_adapter(st.aggregate(init_state(st, 4), updates))["m"].delta()
    torch.testing.assert_close(got, dense)


def test_round_one_hands_out_the_shared_initialisation():
    """Before any aggregation dW = 0: clients start from LoRA's init (B = 0, A from the shared seed)."""
    s = get_strategy("hlora")
    state = init_state(s, 8)
    for r in (2, 8):
        f = s.dispatch(state, ClientSpec(0, {"m": r}, 16.0, 1), torch.Generator()).lora["m"]
        assert f.B.abs().max() == 0 and f.A.shape == (r, K)
        assert torch.equal(f.A, state.init["m"].A[:r])  # PEFT's fresh init, whatever the scaling
    assert s.global_adapter(state)["m"].delta().abs().max() == 0


def test_global_rank_below_a_client_rank_is_padded_and_keeps_the_function():
    facs, updates, _, dense = setup([2], [4], [3])
    s = get_strategy("hlora")
    state = s.aggregate(init_state(s, 8), updates)
    f = s.dispatch(state, ClientSpec(0, {"m": 6}, 12.0, 1), torch.Generator()).lora["m"]
    assert f.rank == 6
    torch.testing.assert_close(f.delta(), dense)
    assert f.A[2:].abs().min() > 0  # padded rows come from the init, so those ranks can train
