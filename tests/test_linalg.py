import pytest
import torch

from hlora.linalg import factored_svd


def random_factors(d, k, ranks, seed=0):
    g = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(d, r, generator=g, dtype=torch.float64) for r in ranks]
    As = [torch.randn(r, k, generator=g, dtype=torch.float64) for r in ranks]
    return Bs, As


def test_factored_svd_equals_dense_svd():
    d, k, ranks = 40, 30, [2, 5, 3, 8]
    Bs, As = random_factors(d, k, ranks)
    w = [0.1, 0.4, 0.2, 0.3]
    dense = sum(wi * B @ A for wi, B, A in zip(w, Bs, As))
    svd = factored_svd(Bs, As, w)
    S_ref = torch.linalg.svdvals(dense)[: svd.rank]
    assert svd.rank == sum(ranks)
    torch.testing.assert_close(svd.S, S_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(svd.dense(), dense, rtol=1e-10, atol=1e-10)
    # orthonormal singular vectors
    torch.testing.assert_close(svd.U.T @ svd.U, torch.eye(svd.rank, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(svd.Vt @ svd.Vt.T, torch.eye(svd.rank, dtype=torch.float64), atol=1e-10, rtol=0)


def test_rank_is_capped_by_the_layer_and_zero_updates_vanish():
    Bs, As = random_factors(6, 5, [4, 4])
    svd = factored_svd(Bs, As, [0.5, 0.5])
    assert svd.rank <= 5
    torch.testing.assert_close(svd.dense(), 0.5 * (Bs[0] @ As[0] + Bs[1] @ As[1]))
    zero = factored_svd([torch.zeros(6, 2)], [torch.randn(2, 5)], [1.0])
    assert zero.rank == 0 and zero.dense().abs().max() == 0


def test_float32_inputs_stay_float32():
    Bs, As = random_factors(10, 8, [2, 3])
    svd = factored_svd([B.float() for B in Bs], [A.float() for A in As], [1.0, 1.0])
    assert svd.U.dtype == svd.S.dtype == svd.Vt.dtype == torch.float32


@pytest.mark.parametrize("method", ["qr", "gram"])
def test_an_empty_or_zero_sum_has_rank_zero(method):
    for B, A in ((torch.zeros(5, 0), torch.zeros(0, 4)), (torch.zeros(5, 2), torch.randn(2, 4))):
        svd = factored_svd([B], [A], [1.0], method=method)
        assert svd.rank == 0 and svd.U.shape == (5, 0) and svd.Vt.shape == (0, 4)
