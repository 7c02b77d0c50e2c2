"""LoRA-FAIR (hlora.strategies.lorafair) against a dense float64 ridge regression."""

import pytest
import torch

from hlora.strategies import StrategyError, get_strategy
from tests.test_cli import run_cli
from tests.test_strategies import D, K, R, global_delta, padded_average, spec, state_for, trained_updates

SPECS = [spec(0, 3, n=1), spec(1, 8, alpha=8.0, n=3), spec(2, 5, alpha=32.0, n=2)]
P = [1 / 6, 3 / 6, 2 / 6]


def averaged(ups):
    """FedAvg of the factors (HetLoRA's zero-padding; every rank is held here) and dW, dense."""
    B, A = padded_average(ups, P)
    return B, A, sum(p * u.lora["m"].delta() for p, u in zip(P, ups))


def dense_ridge(B, A, dW, lam):
    """argmin_X ||(B + X) A - dW||^2 + mu ||X||^2 as a least-squares problem on the stacked system
    [A^T; sqrt(mu) I] X^T = [(dW - B A)^T; 0] (dense, float64)."""
    mu = lam * float((A * A).sum()) / R
    lhs = torch.cat([A.T, mu**0.5 * torch.eye(R, dtype=A.dtype)])
    rhs = torch.cat([(dW - B @ A).T, torch.zeros(R, D, dtype=A.dtype)])
    return torch.linalg.lstsq(lhs, rhs).solution.T, mu


@pytest.mark.parametrize("lam", [0.0, 0.01, 1.0])
def test_correction_is_the_dense_ridge_solution(lam):
    s, state = state_for("lorafair", lam=lam)
    for rnd in range(2):
        ups = trained_updates(s, state, SPECS, seed=rnd)
        B, A, dW = averaged(ups)
        new = s.aggregate(state, ups)
        g = s.global_adapter(new)["m"]
        torch.testing.assert_close(g.A, A)  # A is the plain average
        dB, mu = dense_ridge(B, A, dW, lam)
        torch.testing.assert_close(g.B, B + dB, rtol=1e-9, atol=1e-9)
        # the normal equations hold: the gradient of the objective is zero
        grad = (g.B @ A - dW) @ A.T + mu * (g.B - B)
        assert grad.abs().max() < 1e-8 * max(1.0, float(dW.abs().max()))
        # and the corrected product fits the average of the updates better than FedAvg of the factors
        assert torch.linalg.matrix_norm(g.B @ A - dW) < torch.linalg.matrix_norm(B @ A - dW)
        state = new


def test_no_ridge_projects_the_average_onto_A_rows_and_a_huge_ridge_is_fedavg():
    s0, st0 = state_for("lorafair", lam=0.0)
    ups = trained_updates(s0, st0, SPECS)
    B, A, dW = averaged(ups)
    g = s0.global_adapter(s0.aggregate(st0, ups))["m"]
    proj = A.T @ torch.linalg.solve(A @ A.T, A)  # onto the row space of A (A has full row rank R < K)
    torch.testing.assert_close(g.B @ A, dW @ proj, rtol=1e-9, atol=1e-9)
    big, stb = state_for("lorafair", lam=1e12)
    g = big.global_adapter(big.aggregate(stb, trained_updates(big, stb, SPECS)))["m"]
    torch.testing.assert_close(g.B, B, rtol=1e-9, atol=1e-9)


def test_clients_start_from_the_corrected_factors():
    s, state = state_for("lorafair")
    state = s.aggregate(state, trained_updates(s, state, SPECS))
    g = s.global_adapter(state)["m"]
    pl = s.dispatch(state, spec(3, 4, alpha=12.0), torch.Generator())
    assert torch.equal(pl.lora["m"].B, g.B[:, :4]) and pl.lora["m"].scale == 3.0
    torch.testing.assert_close(pl.lora["m"].delta(), g.B[:, :4] @ g.A[:4])
    # bytes as every factor-averaging method: rank-r factors and the head, both ways
    assert s.downlink_bytes(state, pl) == 4 * (D + K) * 8 + 3 * 8


@pytest.mark.parametrize("lam", [-1, "abc", float("nan")])
def test_a_bad_lambda_is_refused_in_one_line(lam):
    with pytest.raises(StrategyError, match="lam .* must be a number >= 0"):
        get_strategy("lorafair", lam=lam)


def test_single_client_needs_no_correction():
    s, state = state_for("lorafair")
    (u,) = trained_updates(s, state, [spec(0, R)])
    new = s.aggregate(state, [u])
    torch.testing.assert_close(global_delta(s, new), u.lora["m"].delta(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(new.lora["m"].B, u.lora["m"].B, rtol=1e-12, atol=1e-12)


def test_a_bad_lambda_on_the_command_line_exits_2(capsys, tmp_path):
    code, text = run_cli(["run", "--strategy", "lorafair", "--strategy-option", "lam=-1",
                          "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and len(text.strip().splitlines()) == 1
    assert "lorafair's lam (the ridge on dB) must be a number >= 0, got -1" in " ".join(text.split())
