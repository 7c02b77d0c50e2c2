"""Server optimizers (hlora.server_opt) against dense float64 references of their equations."""

import pytest
import torch

from hlora.factors import Factor, init_factors
from hlora.linalg import SVD, factored_svd
from hlora.server_opt import KEY, ServerOpt, ServerOptError, client_change, global_step, momentum_step
from hlora.strategies import ClientSpec, GlobalState, Update, get_strategy

SHAPES = {"m1": (24, 18), "m2": (20, 22)}
TOL = dict(rtol=1e-9, atol=1e-9)


def rand_factor(d, k, r, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return Factor(torch.randn(d, r, generator=g, dtype=torch.float64),
                  torch.randn(r, k, generator=g, dtype=torch.float64), scale)


def rand_svd(d, k, r, seed):
    f = rand_factor(d, k, r, 1.0, seed)
    return factored_svd([f.B], [f.A], [1.0])


def dense_trunc(M, cap):
    """trunc_cap(M) by a dense SVD, and the fraction of ||M||_F^2 it drops."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    kept = (U[:, :cap] * S[:cap]) @ Vh[:cap]
    total = float((S**2).sum())
    return kept, (0.0 if total == 0 else float((S[cap:] ** 2).sum()) / total)


def dense_of(strategy, state):
    return {m: f.delta() for m, f in strategy.global_adapter(state).items()}


def make_init(rank=8, shapes=SHAPES):
    init = init_factors(shapes, rank, torch.Generator().manual_seed(0))
    return {m: Factor(f.B.double(), f.A.double(), 1.0) for m, f in init.items()}


def spec(i, r, alpha=16.0, n=10):
    return ClientSpec(i, dict.fromkeys(SHAPES, r), alpha, n)


def perturb(strategy, state, specs, seed, noise=1.0):
    """Dispatch to each client, then 'train': perturb its trainable factors and the head."""
    sent, updates = [], []
    for c in specs:
        payload = strategy.dispatch(state, c, torch.Generator().manual_seed(seed + c.id))
        g = torch.Generator().manual_seed(1000 + seed + c.id)
        lora = {}
        for m, f in payload.lora.items():
            B = f.B + noise * torch.randn(f.B.shape, generator=g, dtype=f.B.dtype)
            A = f.A
            if payload.train_A:
                A = f.A + noise * torch.randn(f.A.shape, generator=g, dtype=f.A.dtype)
            lora[m] = Factor(B, A, f.scale)
        head = {n: h + torch.randn(h.shape, generator=g, dtype=h.dtype) for n, h in payload.head.items()}
        sent.append(payload)
        updates.append(Update(c.id, lora, head, c.num_examples, dict(payload.info)))
    return sent, updates


def head0():
    g = torch.Generator().manual_seed(7)
    return {"classifier.weight": torch.randn(2, 5, generator=g, dtype=torch.float64),
            "classifier.bias": torch.randn(2, generator=g, dtype=torch.float64)}


def warm_state(name):
    """A product-space state whose G has rank 15 (> every client's rank): a round of HLoRA from scratch."""
    s = get_strategy(name)
    state = s.init_state(make_init(8), head0())
    _, ups = perturb(s, state, [spec(0, 2, n=5), spec(1, 5, alpha=8.0, n=20), spec(2, 8, n=15)], seed=50)
    state = s.aggregate(state, ups)
    assert all(svd.rank == 15 for svd in state.lora.values())
    return s, state


# --- product space: the factored pieces ------------------------------------------------------------


def test_client_change_is_the_weighted_sum_of_scaled_product_changes():
    d, k = SHAPES["m1"]
    ranks, scales, w = [2, 5, 3], [8.0, 16 / 5, 0.5], [0.2, 0.5, 0.3]
    trained = [rand_factor(d, k, r, s, seed=i) for i, (r, s) in enumerate(zip(ranks, scales))]
    received = [rand_factor(d, k, r, 2 * s + 1, seed=10 + i) for i, (r, s) in enumerate(zip(ranks, scales))]
    D = client_change(trained, received, w)
    ref = sum(p * (f.scale * f.B @ f.A - f0.scale * f0.B @ f0.A) for p, f, f0 in zip(w, trained, received))
    assert D.U.dtype == torch.float64 and D.rank <= 2 * sum(ranks)
    torch.testing.assert_close(D.dense(), ref, **TOL)
    # a thin SVD: orthonormal U and V, descending singular values
    torch.testing.assert_close(D.U.T @ D.U, torch.eye(D.rank, dtype=torch.float64), **TOL)
    torch.testing.assert_close(D.Vt @ D.Vt.T, torch.eye(D.rank, dtype=torch.float64), **TOL)
    assert bool((D.S[:-1] >= D.S[1:]).all())


def test_client_change_of_an_untrained_client_is_zero():
    d, k = SHAPES["m1"]
    f = rand_factor(d, k, 4, 4.0, seed=0)
    other = rand_factor(d, k, 3, 2.0, seed=1)
    D = client_change([f, other], [f, rand_factor(d, k, 3, 2.0, seed=1)], [0.5, 0.5])
    assert float(D.dense().abs().max()) < 1e-12


@pytest.mark.parametrize("beta,cap", [(0.9, 4), (0.5, 100), (0.0, 3)])
def test_momentum_step_is_the_truncated_dense_sum(beta, cap):
    d, k = SHAPES["m1"]
    prev, change = rand_svd(d, k, 5, seed=1), rand_svd(d, k, 4, seed=2)
    mom, dropped = momentum_step(prev, change, beta, cap)
    ref, ref_dropped = dense_trunc(beta * prev.dense() + change.dense(), cap)
    assert mom.rank <= cap
    torch.testing.assert_close(mom.dense(), ref, **TOL)
    assert dropped == pytest.approx(ref_dropped, abs=1e-12)
    if cap < 9 and beta:
        assert dropped > 0.0
    if cap >= 9:
        assert dropped == pytest.approx(0.0, abs=1e-12)


def test_momentum_step_without_a_previous_momentum_is_the_truncated_change():
    d, k = SHAPES["m2"]
    change = rand_svd(d, k, 6, seed=3)
    mom, dropped = momentum_step(None, change, 0.9, 4)
    ref, ref_dropped = dense_trunc(change.dense(), 4)
    torch.testing.assert_close(mom.dense(), ref, **TOL)
    assert dropped == pytest.approx(ref_dropped, abs=1e-12) and dropped > 0


@pytest.mark.parametrize("lr,cap", [(1.0, 100), (0.3, 5), (2.0, 2)])
def test_global_step_is_the_truncated_dense_sum(lr, cap):
    d, k = SHAPES["m2"]
    G, m = rand_svd(d, k, 6, seed=4), rand_svd(d, k, 3, seed=5)
    new, dropped = global_step(G, m, lr, cap)
    ref, ref_dropped = dense_trunc(G.dense() + lr * m.dense(), cap)
    assert new.rank <= cap
    torch.testing.assert_close(new.dense(), ref, **TOL)
    assert dropped == pytest.approx(ref_dropped, abs=1e-12)


def test_global_step_from_an_empty_G():
    d, k = SHAPES["m1"]
    empty = SVD(torch.zeros(d, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64),
                torch.zeros(0, k, dtype=torch.float64))
    m = rand_svd(d, k, 3, seed=6)
    new, dropped = global_step(empty, m, 0.5, 8)
    torch.testing.assert_close(new.dense(), 0.5 * m.dense(), **TOL)
    assert dropped == 0.0


# --- product space: whole rounds -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hlora", "flexlora"])
def test_avgm_at_lr_1_momentum_0_keeps_what_hlora_drops(name):
    """G_t - HLoRA_t = sum_k p_k (G_{t-1} - trunc_{r_k} G_{t-1}), no cap (rank 64 > every sum here)."""
    s, state = warm_state(name)
    specs = [spec(0, 2, n=10), spec(1, 4, alpha=32.0, n=30), spec(2, 6, alpha=8.0, n=20)]
    sent, updates = perturb(s, state, specs, seed=0)
    p = [c.num_examples / 60 for c in specs]
    new = ServerOpt("avgm", lr=1.0, momentum=0.0, rank=64).step(s, state, updates, sent)
    plain = s.aggregate(state, updates)
    assert new.round == state.round + 1
    for m in SHAPES:
        G = state.lora[m].dense()
        keeps = sum(pk * (G - dense_trunc(G, c.ranks[m])[0]) for pk, c in zip(p, specs))
        torch.testing.assert_close(new.lora[m].dense() - plain.lora[m].dense(), keeps, **TOL)
        assert float(keeps.norm()) > 1e-3 * float(G.norm())  # the identity is not trivially 0 = 0
        # and G_t is G_{t-1} plus the clients' own changes
        D = sum(pk * (u.lora[m].delta() - pay.lora[m].delta()) for pk, u, pay in zip(p, updates, sent))
        torch.testing.assert_close(new.lora[m].dense(), G + D, **TOL)
    for n in state.head:  # momentum 0, lr 1: the head is the plain average
        torch.testing.assert_close(new.head[n], plain.head[n], **TOL)
    assert new.extra["server_energy_dropped"] == pytest.approx(0.0, abs=1e-12)
    assert set(new.extra[KEY]) >= {("m", m) for m in SHAPES}


@pytest.mark.parametrize("name", ["hlora", "flexlora"])
def test_avgm_momentum_over_two_rounds_matches_a_dense_reimplementation(name):
    beta, lr, cap = 0.9, 0.7, 6
    s, state = warm_state(name)
    opt = ServerOpt("avgm", lr=lr, momentum=beta, rank=cap)
    G = {m: state.lora[m].dense() for m in SHAPES}
    M = {m: torch.zeros(SHAPES[m], dtype=torch.float64) for m in SHAPES}
    h = {n: t.clone() for n, t in state.head.items()}
    hm = {n: torch.zeros_like(t) for n, t in h.items()}
    rounds = [[spec(0, 2, n=10), spec(1, 5, alpha=8.0, n=30), spec(2, 3, n=20)],
              [spec(3, 4, n=25), spec(4, 6, alpha=32.0, n=5)]]
    for t, specs in enumerate(rounds):
        sent, updates = perturb(s, state, specs, seed=100 * (t + 1), noise=0.5)
        n = sum(c.num_examples for c in specs)
        p = [c.num_examples / n for c in specs]
        new = opt.step(s, state, updates, sent)
        dropped = 0.0
        for m in SHAPES:
            D = sum(pk * (u.lora[m].delta() - pay.lora[m].delta()) for pk, u, pay in zip(p, updates, sent))
            M[m], e1 = dense_trunc(beta * M[m] + D, cap)
            G[m], e2 = dense_trunc(G[m] + lr * M[m], cap)
            dropped = max(dropped, e1, e2)
            assert new.lora[m].rank <= cap and new.extra[KEY][("m", m)].rank <= cap
            torch.testing.assert_close(new.extra[KEY][("m", m)].dense(), M[m], **TOL)
            torch.testing.assert_close(new.lora[m].dense(), G[m], **TOL)
            torch.testing.assert_close(dense_of(s, new)[m], G[m], **TOL)
        for name_ in h:
            avg = sum(pk * u.head[name_] for pk, u in zip(p, updates))
            hm[name_] = beta * hm[name_] + (avg - h[name_])
            h[name_] = h[name_] + lr * hm[name_]
            torch.testing.assert_close(new.head[name_], h[name_], **TOL)
        assert dropped > 0
        assert new.extra["server_energy_dropped"] == pytest.approx(dropped, rel=1e-9, abs=1e-12)
        assert new.round == state.round + 1
        state = new


def test_product_space_step_does_not_mutate_the_previous_state():
    s, state = warm_state("hlora")
    sent, updates = perturb(s, state, [spec(0, 3), spec(1, 5)], seed=3)
    opt = ServerOpt("avgm", lr=1.0, momentum=0.9, rank=8)
    first = opt.step(s, state, updates, sent)
    assert KEY not in state.extra
    before = {k: v.dense().clone() for k, v in first.extra[KEY].items() if isinstance(v, SVD)}
    sent2, updates2 = perturb(s, first, [spec(0, 3), spec(1, 5)], seed=4)
    opt.step(s, first, updates2, sent2)
    for k, v in before.items():
        assert torch.equal(first.extra[KEY][k].dense(), v)


# --- factor space ----------------------------------------------------------------------------------


def fedopt_reference(name, x, target, mom, key, lr, beta, betas, tau):
    """The module docstring's equations on one tensor, with moments in ``mom`` (first m, then v)."""
    delta = target - x
    m = mom.get(("m", key), torch.zeros_like(x))
    if name == "avgm":
        m = beta * m + delta
        mom[("m", key)] = m
        return x + lr * m
    b1, b2 = betas
    v = mom.get(("v", key), torch.zeros_like(x))
    m = b1 * m + (1 - b1) * delta
    if name == "adam":
        v = b2 * v + (1 - b2) * delta**2
    else:
        v = v - (1 - b2) * delta**2 * torch.sign(v - delta**2)
    mom[("m", key)], mom[("v", key)] = m, v
    return x + lr * m / (torch.sqrt(v) + tau)


@pytest.mark.parametrize("strategy", ["fedit", "ffa", "rolora", "lorafair"])
@pytest.mark.parametrize("name", ["avgm", "adam", "yogi"])
def test_factor_space_optimizers_match_the_fedopt_equations_over_two_rounds(strategy, name):
    lr, beta, betas, tau = 0.5, 0.8, (0.9, 0.99), 1e-3
    s = get_strategy(strategy)
    state = s.init_state(make_init(4), head0())
    opt = ServerOpt(name, lr=lr, momentum=beta if name == "avgm" else 0.0, betas=betas, tau=tau)
    ref_state = state
    mom: dict = {}
    for t in range(2):
        specs = [spec(0, 4, n=10), spec(1, 4, n=30), spec(2, 4, n=20)]
        sent, updates = perturb(s, state, specs, seed=10 * (t + 1), noise=0.3)
        new = opt.step(s, state, updates, sent)
        target = s.aggregate(ref_state, updates)  # the strategy's rule (tested in test_strategies)
        lora = {}
        for m in SHAPES:
            old, agg = ref_state.lora[m], target.lora[m]
            lora[m] = Factor(fedopt_reference(name, old.B, agg.B, mom, ("B", m), lr, beta, betas, tau),
                             fedopt_reference(name, old.A, agg.A, mom, ("A", m), lr, beta, betas, tau), 1.0)
        head = {
            n: fedopt_reference(name, ref_state.head[n], target.head[n], mom, ("h", n), lr, beta, betas, tau)
            for n in ref_state.head
        }
        ref_state = GlobalState(lora, head, state.init, ref_state.round + 1)
        assert new.round == t + 1
        for m in SHAPES:
            assert new.lora[m].scale == 1.0
            torch.testing.assert_close(new.lora[m].B, lora[m].B, **TOL)
            torch.testing.assert_close(new.lora[m].A, lora[m].A, **TOL)
            # the server step is not the plain aggregate (else the test would prove nothing)
            if strategy == "fedit" or t == 0:
                assert not torch.allclose(new.lora[m].B, target.lora[m].B)
        for n in head:
            torch.testing.assert_close(new.head[n], head[n], **TOL)
        state = new
    # the moments the step carries are the reference's
    for (kind, key), v in mom.items():
        torch.testing.assert_close(state.extra[KEY][(kind,) + key], v, **TOL)


@pytest.mark.parametrize("name", ["hlora", "flexlora", "fedit", "hetlora", "ffa", "fedplora", "flora",
                                  "fedex", "rolora", "lorafair"])
def test_avg_is_exactly_the_strategys_aggregate(name):
    s = get_strategy(name)
    state = s.init_state(make_init(8), head0())
    r = 8 if name in ("fedit", "fedplora") else None
    specs = [spec(0, r or 3, n=10), spec(1, r or 6, n=20), spec(2, r or 8, n=5)]
    sent, updates = perturb(s, state, specs, seed=1)
    state = s.aggregate(state, updates)  # a warm state
    sent, updates = perturb(s, state, specs, seed=2)
    got = ServerOpt("avg").step(s, state, updates, sent)
    want = s.aggregate(state, updates)
    assert got.round == want.round and set(got.lora) == set(want.lora)
    for m in want.lora:
        a, b = got.lora[m], want.lora[m]
        assert type(a) is type(b)
        fields = ("U", "S", "Vt") if isinstance(b, SVD) else ("B", "A")
        for f in fields:
            assert torch.equal(getattr(a, f), getattr(b, f))
        if isinstance(b, Factor):
            assert a.scale == b.scale
    for n in want.head:
        assert torch.equal(got.head[n], want.head[n])
    assert KEY not in got.extra and got.extra.keys() == want.extra.keys()


# --- check -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opt,strategy,msg",
    [
        (ServerOpt("adam"), "hlora", "elementwise"),
        (ServerOpt("yogi"), "hlora", "elementwise"),
        (ServerOpt("adam"), "flexlora", "elementwise"),
        (ServerOpt("yogi"), "flexlora", "elementwise"),
        (ServerOpt("avgm", momentum=0.9), "flora", "not defined for flora"),
        (ServerOpt("adam"), "flora", "not defined for flora"),
        (ServerOpt("avgm", momentum=0.9), "fedex", "not defined for fedex"),
        (ServerOpt("yogi"), "fedex", "not defined for fedex"),
        (ServerOpt("yogi"), "centralized", "not defined for centralized"),
        (ServerOpt("avgm"), "centralized", "not defined for centralized"),
        (ServerOpt("sgd"), "fedit", "--server-opt must be one of"),
        (ServerOpt("avgm", lr=0.0), "fedit", "--server-lr must be > 0"),
        (ServerOpt("adam", lr=-1.0), "fedit", "--server-lr must be > 0"),
        (ServerOpt("avgm", momentum=1.0), "hlora", r"--server-momentum must be in \[0, 1\)"),
        (ServerOpt("avgm", momentum=-0.1), "hlora", r"--server-momentum must be in \[0, 1\)"),
        (ServerOpt("adam", betas=(0.9, 1.0)), "fedit", "--server-betas"),
        (ServerOpt("adam", betas=(-0.1, 0.9)), "fedit", "--server-betas"),
        (ServerOpt("adam", betas=(0.9,)), "fedit", "--server-betas"),
        (ServerOpt("yogi", tau=0.0), "fedit", "--server-tau must be > 0"),
        (ServerOpt("avgm", rank=0), "hlora", "--server-rank must be at least 1"),
        (ServerOpt("avg", lr=0.5), "hlora", "--server-lr and --server-momentum need"),
        (ServerOpt("avg", lr=2.0), "fedit", "--server-lr and --server-momentum need"),
        (ServerOpt("avg", momentum=0.9), "fedit", "--server-lr and --server-momentum need"),
    ],
)
def test_check_refuses(opt, strategy, msg):
    with pytest.raises(ServerOptError, match=msg):
        opt.check(strategy)


@pytest.mark.parametrize(
    "opt,strategy",
    [(ServerOpt("avg"), "flora"), (ServerOpt("avg"), "centralized"), (ServerOpt("avg"), "hlora"),
     (ServerOpt("avgm", lr=0.5, momentum=0.9), "hlora"), (ServerOpt("avgm", momentum=0.9), "flexlora"),
     (ServerOpt("adam", lr=0.01), "fedit"), (ServerOpt("yogi"), "hetlora"), (ServerOpt("adam"), "ffa"),
     (ServerOpt("avgm"), "fedplora")],
)
def test_check_accepts(opt, strategy):
    assert opt.check(strategy) is opt


def test_server_opt_error_is_a_user_error():
    from hlora.cli import USER_ERRORS

    assert issubclass(ServerOptError, USER_ERRORS)


# --- checkpoint and resume -------------------------------------------------------------------------


class StopAfter:
    """A reporter that interrupts the run once round ``n`` is checkpointed."""

    def __init__(self, n):
        self.n = n

    def start(self, *a): ...
    def round_start(self, *a): ...
    def advance(self, *a): ...
    def finish(self, *a): ...

    def round_end(self, row):
        if row["round"] >= self.n:
            raise KeyboardInterrupt


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]


@pytest.mark.parametrize(
    "extra",
    [dict(strategy="hlora", server_opt="avgm", server_momentum=0.9, server_rank=6),
     dict(strategy="fedit", ranks="4", server_opt="adam", server_lr=0.01)],
    ids=["hlora-avgm", "fedit-adam"],
)
def test_resume_with_a_server_optimizer_gives_the_same_metrics(extra, tiny_args, tmp_path):
    from hlora import run
    from hlora.checkpoint import load_checkpoint
    from hlora.engine.simulation import resume
    from tests.test_run import tiny_config

    cfg = lambda out: tiny_config(tiny_args, out, rounds=3, **extra)  # noqa: E731
    ref = run(cfg(tmp_path / "ref"))
    with pytest.raises(KeyboardInterrupt):
        run(cfg(tmp_path / "cut"), StopAfter(1))
    assert not (tmp_path / "cut" / "summary.json").exists()
    state, saved = load_checkpoint(tmp_path / "cut")
    assert state.round == 1 and len(saved["rows"]) == 1
    moments = state.extra[KEY]
    modules = set(state.lora)
    if extra["strategy"] == "hlora":
        assert {k for k in moments if len(k) == 2} == {("m", m) for m in modules}
        assert all(isinstance(moments[("m", m)], SVD) and moments[("m", m)].rank >= 1 for m in modules)
        assert any(k[:2] == ("m", "h") for k in moments)  # the head's momentum
    else:
        for kind in ("m", "v"):
            for part in ("B", "A"):
                assert all(isinstance(moments[(kind, part, m)], torch.Tensor) for m in modules)
        assert all(float(moments[("v", "B", m)].abs().sum()) > 0 for m in modules)

    res = resume(tmp_path / "cut")
    assert _strip(res.rows) == _strip(ref.rows)
    assert res.summary["final_accuracy"] == ref.summary["final_accuracy"]
    a, _ = load_checkpoint(tmp_path / "cut")
    b, _ = load_checkpoint(tmp_path / "ref")
    s = get_strategy(extra["strategy"])
    for m in b.lora:
        assert torch.equal(s.global_adapter(a)[m].delta(), s.global_adapter(b)[m].delta())
    assert set(a.extra[KEY]) == set(b.extra[KEY])


def test_momentum_changes_the_run(tiny_args, tmp_path):
    """The server optimizer reaches the simulation: avgm with momentum is not the plain HLoRA run."""
    from hlora import run
    from tests.test_run import tiny_config

    plain = run(tiny_config(tiny_args, tmp_path / "plain", rounds=2, server_opt="avg"))
    mom = run(tiny_config(tiny_args, tmp_path / "mom", rounds=2, server_opt="avgm", server_lr=1.0,
                          server_momentum=0.9))
    # round 1 from G = 0 and no momentum: G_1 = sum_k p_k s_k B_k A_k, HLoRA's own aggregate
    assert mom.rows[0]["eval_loss"] == pytest.approx(plain.rows[0]["eval_loss"], rel=1e-4)
    assert plain.rows[-1]["eval_loss"] != mom.rows[-1]["eval_loss"]


# --- client weights -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hlora", "fedit"])
def test_uniform_client_weights_give_each_update_weight_one_over_k(name):
    """server_round(client_weights="uniform") aggregates as if every client held one example: for HLoRA the
    global update is the plain mean of the clients' effective updates, against a dense float64 reference."""
    from hlora.server import server_round

    s = get_strategy(name)
    state = s.init_state(make_init(4), head0())
    specs = [spec(0, 4, n=5), spec(1, 4, n=50), spec(2, 4, n=15)]
    sent, updates = perturb(s, state, specs, seed=3)
    by_id = {u.client: u for u in updates}

    def execute(pairs):
        return [by_id[c.id] for c, _ in pairs]

    out = server_round(s, state, specs, execute, round=1, seed=0, max_norm_ratio=0, client_weights="uniform")
    ref = s.aggregate(state, [Update(u.client, u.lora, u.head, 1, u.info) for u in updates])
    for m in SHAPES:
        torch.testing.assert_close(dense_of(s, out.state)[m], dense_of(s, ref)[m])
    if name == "hlora":
        for m in SHAPES:
            mean = sum(u.lora[m].scale * u.lora[m].B @ u.lora[m].A for u in updates) / len(updates)
            torch.testing.assert_close(dense_of(s, out.state)[m], mean)
    weighted = server_round(s, state, specs, execute, round=1, seed=0, max_norm_ratio=0)
    assert not torch.allclose(dense_of(s, weighted.state)["m1"], dense_of(s, out.state)["m1"])
    assert [u.num_examples for u in out.accepted] == [5, 50, 15]  # the record keeps the real sizes
