"""Client-level differential privacy (hlora.privacy): the noise's scale, the accountant against
dp-accounting's own, clipping before noise against dense float64 references, a DP run on the tiny model
and its resume, and the refusals."""

import json
import math

import pytest
import torch
import yaml

dp_accounting = pytest.importorskip("dp_accounting")

from hlora.config import ConfigError  # noqa: E402
from hlora.factors import Factor  # noqa: E402
from hlora.privacy import (  # noqa: E402
    CLIP_KEY,
    DP,
    ORDERS,
    PrivacyError,
    add_noise,
    calibrate_noise,
    default_delta,
    private_step,
    spent_epsilon,
)
from hlora.server import server_round  # noqa: E402
from hlora.server_opt import ServerOpt  # noqa: E402
from hlora.strategies import ClientSpec, Update, get_strategy  # noqa: E402
from tests.test_cli import run_cli  # noqa: E402
from tests.test_robust import dense_change  # noqa: E402
from tests.test_run import tiny_config  # noqa: E402
from tests.test_server_opt import StopAfter, _strip  # noqa: E402

SHAPES = {"q": (12, 9), "v": (7, 10)}


# --- the noise ---------------------------------------------------------------------------------------


def test_noise_has_the_stated_std_on_a_large_tensor():
    dp = DP(clip=0.5, noise=1.3)
    std = dp.std(per_round=4)
    assert std == pytest.approx(1.3 * 0.5 / 4)
    x = add_noise(torch.zeros(1000, 1000), std, torch.Generator().manual_seed(0))
    assert float(x.mean()) == pytest.approx(0.0, abs=3 * std / 1000)
    assert float(x.std()) == pytest.approx(std, rel=0.01)


def test_a_private_step_adds_noise_of_the_stated_std_to_every_module_and_the_head():
    """No client moved (every change is 0): the new global update is the truncated noise; at full rank
    (--server-rank >= min(d, k)) nothing is truncated and its entries have std z C / m."""
    strategy = get_strategy("hlora")
    d, k = 300, 200
    init = {"q": Factor(torch.zeros(d, 4), torch.randn(4, k, generator=torch.Generator().manual_seed(1)), 1.0)}
    state = strategy.init_state(init, {"w": torch.zeros(50, 100)})
    specs = [ClientSpec(i, {"q": 4}, 8.0, 10) for i in range(4)]
    sent = [strategy.dispatch(state, s, torch.Generator()) for s in specs]
    updates = [Update(s.id, p.lora, p.head, 10) for s, p in zip(specs, sent)]
    std = DP(clip=2.0, noise=0.9).std(per_round=4)
    new = private_step(state, updates, sent, per_round=4, std=std, generator=torch.Generator().manual_seed(2),
                       opt=ServerOpt(rank=min(d, k)))
    noise = strategy.global_adapter(new)["q"].delta()
    assert float(noise.std()) == pytest.approx(std, rel=0.02)
    assert float(new.head["w"].std()) == pytest.approx(std, rel=0.03)


def test_the_noise_comes_from_seed_and_round_alone():
    from hlora.privacy import noise_generator

    a = torch.randn(5, generator=noise_generator(0, 3))
    assert torch.equal(a, torch.randn(5, generator=noise_generator(0, 3)))
    assert not torch.equal(a, torch.randn(5, generator=noise_generator(0, 4)))
    assert not torch.equal(a, torch.randn(5, generator=noise_generator(1, 3)))


# --- the accountant ----------------------------------------------------------------------------------


def library_epsilon(q, z, rounds, delta, orders=ORDERS):
    accountant = dp_accounting.rdp.RdpAccountant(list(orders))
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("q,z,rounds,delta", [(0.2, 1.1, 40, 1e-5), (0.05, 0.8, 100, 1e-6), (1.0, 2.0, 10, 1e-3)])
def test_epsilon_is_dp_accountings_own(q, z, rounds, delta):
    eps = spent_epsilon(q, z, rounds, delta)
    assert eps == library_epsilon(q, z, rounds, delta)
    # the integer orders lose little against a finer grid of orders (the optimum lies between them)
    fine = library_epsilon(q, z, rounds, delta, orders=[1 + x / 20 for x in range(20, 200)] + list(range(11, 257)))
    assert fine <= eps <= 1.05 * fine
    assert spent_epsilon(q, z, rounds + 1, delta) > eps  # each round spends more
    assert spent_epsilon(q, 0.0, rounds, delta) == math.inf and spent_epsilon(q, z, 0, delta) == 0.0


@pytest.mark.parametrize("q,rounds,target,delta", [(0.2, 40, 3.0, 1e-5), (0.02, 200, 1.0, 1e-6)])
def test_the_epsilon_target_gives_a_noise_whose_epsilon_is_at_most_the_target_and_close(q, rounds, target, delta):
    z = calibrate_noise(q, rounds, target, delta)
    eps = library_epsilon(q, z, rounds, delta)
    assert eps <= target and eps >= 0.99 * target
    dp = DP(clip=1.0, epsilon_target=target, delta=delta).check(
        strategy="hlora", clients=round(10 / q), per_round=10, rounds=rounds)
    assert dp.noise == pytest.approx(calibrate_noise(10 / round(10 / q), rounds, target, delta))


def test_the_default_delta_is_below_one_over_the_clients():
    assert default_delta(100) == pytest.approx(100**-1.1) and default_delta(100) < 1 / 100
    dp = DP(clip=1.0, noise=1.0).check(strategy="hlora", clients=100, per_round=10, rounds=5)
    assert dp.delta == default_delta(100)


# --- clipping, then noise: a round against dense float64 references ----------------------------------


def dp_round(strategy_name, C, z, server_opt=None, seed=0):
    """Five sampled clients on a global update (B0 != 0): client 3 moves 1000x more than the others,
    client 4 sends NaN (rejected). Float64 factors, so the references hold to rounding."""
    strategy = get_strategy(strategy_name)
    g = torch.Generator().manual_seed(3)
    init = {m: Factor(torch.zeros(d, 4, dtype=torch.float64), torch.randn(4, k, generator=g, dtype=torch.float64),
                      1.0) for m, (d, k) in SHAPES.items()}
    start = strategy.init_state(init, {"w": torch.zeros(2, 5, dtype=torch.float64)})
    first = {m: Factor(torch.randn(d, 4, generator=g, dtype=torch.float64), init[m].A, 2.0)
             for m, (d, k) in SHAPES.items()}
    state = strategy.aggregate(start, [Update(0, first, start.head, 1)])
    clients = [ClientSpec(i, dict.fromkeys(SHAPES, r), 8.0, 5 + 40 * i) for i, r in enumerate([2, 4, 3, 4, 2])]
    bumps = [1.0, 1.0, 1.0, 1000.0, 1.0]

    def execute(pairs):
        out = []
        for (spec, p), bump in zip(pairs, bumps):
            lora = {m: Factor(f.B + bump * 0.1 * torch.randn(f.B.shape, generator=g, dtype=torch.float64),
                              f.A + 0.1 * torch.randn(f.A.shape, generator=g, dtype=torch.float64), f.scale)
                    for m, f in p.lora.items()}
            if spec.id == 4:
                lora["q"] = Factor(lora["q"].B * float("nan"), lora["q"].A, lora["q"].scale)
            out.append(Update(spec.id, lora, {"w": p.head["w"] + 0.1 * bump}, spec.num_examples))
        return out

    out = server_round(strategy, state, clients, execute, round=1, seed=seed, dp=DP(clip=C, noise=z),
                       server_opt=server_opt)
    payloads = [strategy.dispatch(state, spec, torch.Generator()) for spec in clients]
    return strategy, state, out, payloads


def clipped_mean_reference(strategy, state, out, payloads, C, m=5, lr=1.0):
    """G + lr (1/m) sum_k min(1, C / ||Delta_k||) Delta_k, dense float64, per module and for the head."""
    sent = {p_id: p for p_id, p in enumerate(payloads)}
    G = {name: f.delta().double() for name, f in strategy.global_adapter(state).items()}
    head = {n: t.double().clone() for n, t in state.head.items()}
    for u in out.accepted:
        p = sent[u.client]
        c = min(1.0, C / float(dense_change(u, p).norm()))
        for name in SHAPES:
            G[name] += lr * c / m * (u.lora[name].delta().double() - p.lora[name].delta().double())
        for n in head:
            head[n] += lr * c / m * (u.head[n].double() - p.head[n].double())
    return G, head


@pytest.mark.parametrize("strategy_name", ["hlora", "flexlora"])
def test_with_noise_0_a_dp_round_is_the_clipped_uniform_average_of_a_dense_reference(strategy_name):
    C = 0.8
    strategy, state, out, payloads = dp_round(strategy_name, C, z=0.0)
    assert [r["client"] for r in out.rejected] == [4]  # the NaN update; the denominator stays 5
    assert 3 in [c["client"] for c in out.clipped]
    G, head = clipped_mean_reference(strategy, state, out, payloads, C)
    got = strategy.global_adapter(out.state)
    for name in SHAPES:
        torch.testing.assert_close(got[name].delta(), G[name], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.state.head["w"], head["w"], rtol=1e-9, atol=1e-12)


def test_a_server_optimizer_steps_with_the_clipped_average():
    C = 0.8
    strategy, state, out, payloads = dp_round("hlora", C, z=0.0, server_opt=ServerOpt("avgm", lr=2.0))
    G, head = clipped_mean_reference(strategy, state, out, payloads, C, lr=2.0)
    got = strategy.global_adapter(out.state)
    for name in SHAPES:
        torch.testing.assert_close(got[name].delta(), G[name], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.state.head["w"], head["w"], rtol=1e-9, atol=1e-12)


def test_clipping_comes_before_the_noise():
    """With noise, the aggregate's distance to the clipped mean is noise-sized (sigma sqrt(entries)), far
    below the huge client's unclipped change / m."""
    C, z, m = 0.8, 0.5, 5
    strategy, state, out, payloads = dp_round("hlora", C, z)
    G, head = clipped_mean_reference(strategy, state, out, payloads, C)
    got = strategy.global_adapter(out.state)
    sq = sum(float(((got[n].delta() - G[n]) ** 2).sum()) for n in SHAPES)
    sq += float(((out.state.head["w"] - head["w"]) ** 2).sum())
    entries = sum(d * k for d, k in SHAPES.values()) + 10
    sigma = z * C / m
    assert 0.7 * sigma * entries**0.5 < sq**0.5 < 1.3 * sigma * entries**0.5
    huge = next(u for u in out.accepted if u.client == 3)
    assert float(dense_change(huge, payloads[3]).norm()) / m > 100 * sq**0.5


def test_a_dp_round_is_never_skipped_and_without_valid_updates_releases_the_noise_alone():
    strategy = get_strategy("hlora")
    g = torch.Generator().manual_seed(5)
    init = {m: Factor(torch.zeros(d, 2, dtype=torch.float64), torch.randn(2, k, generator=g, dtype=torch.float64),
                      1.0) for m, (d, k) in SHAPES.items()}
    start = strategy.init_state(init, {"w": torch.zeros(2, 5, dtype=torch.float64)})
    state = strategy.aggregate(start, [Update(0, {m: Factor(torch.randn(f.B.shape, generator=g, dtype=torch.float64),
                                                           f.A, 1.0) for m, f in init.items()}, start.head, 1)])
    clients = [ClientSpec(i, dict.fromkeys(SHAPES, 2), 8.0, 5) for i in range(3)]

    def broken(pairs):  # every update holds NaN: all rejected
        return [Update(s.id, {m: Factor(f.B * float("nan"), f.A, f.scale) for m, f in p.lora.items()}, p.head, 5)
                for s, p in pairs]

    before = {m: f.delta() for m, f in strategy.global_adapter(state).items()}
    for z in (0.0, 1.0):
        out = server_round(strategy, state, clients, broken, round=1, seed=0, min_clients=2,
                           dp=DP(clip=3.0, noise=z))
        assert len(out.rejected) == 3 and not out.skipped and out.state.round == state.round + 1
        moved = torch.cat([(f.delta() - before[m]).flatten() for m, f in strategy.global_adapter(out.state).items()])
        if z == 0:
            assert float(moved.abs().max()) < 1e-12
        else:
            assert float(moved.std()) == pytest.approx(z * 3.0 / 3, rel=0.3)


# --- DP on the released factors (fedit, ffa, rolora) ------------------------------------------------


def factor_dp_round(name, C, z, ranks, server_opt=None, R=None):
    """A DP round of a FACTOR_DP strategy from a trained state: clients move only the factors they train
    (client 3 by a lot, client 4 sends NaN), float64."""
    strategy = get_strategy(name)
    g = torch.Generator().manual_seed(11)
    R = R or max(ranks)
    init = {m: Factor(torch.zeros(d, R, dtype=torch.float64), torch.randn(R, k, generator=g, dtype=torch.float64),
                      1.0) for m, (d, k) in SHAPES.items()}
    start = strategy.init_state(init, {"w": torch.zeros(2, 5, dtype=torch.float64)})
    first = {m: Factor(torch.randn(d, R, generator=g, dtype=torch.float64), init[m].A, 2.0)
             for m, (d, k) in SHAPES.items()}
    state = strategy.aggregate(start, [Update(0, first, start.head, 1)])  # rolora: now an A round
    clients = [ClientSpec(i, dict.fromkeys(SHAPES, r), 8.0 + 8.0 * (i % 2), 5 + 40 * i) for i, r in enumerate(ranks)]
    bumps = [1.0, 1.0, 1.0, 1000.0, 1.0]

    def execute(pairs):
        out = []
        for (spec, p), bump in zip(pairs, bumps):
            lora = {}
            for m, f in p.lora.items():
                B = f.B + bump * 0.1 * torch.randn(f.B.shape, generator=g, dtype=torch.float64) if p.train_B else f.B
                A = f.A + 0.1 * torch.randn(f.A.shape, generator=g, dtype=torch.float64) if p.train_A else f.A
                lora[m] = Factor(B * float("nan") if spec.id == 4 else B, A, f.scale)
            out.append(Update(spec.id, lora, {"w": p.head["w"] + 0.1 * bump}, spec.num_examples, dict(p.info)))
        return out

    out = server_round(strategy, state, clients, execute, round=1, seed=0, dp=DP(clip=C, noise=z),
                       server_opt=server_opt, client_weights="uniform")
    payloads = [strategy.dispatch(state, spec, torch.Generator()) for spec in clients]
    return strategy, state, out, payloads


def factor_reference(name, state, out, payloads, C, m=5):
    """x + (1/m) sum_k min(1, C / ||Delta_k||) Delta_k, dense float64 by hand: Delta_k is the client's change
    of the global factors at scaling 1 (ffa: s (B - B0) zero-padded; fedit: B - B0 and s (A - A0); rolora in
    an A round: s (A - A0) zero-padded) and of the head."""
    B = {n: f.B.clone() for n, f in state.lora.items()}
    A = {n: f.A.clone() for n, f in state.lora.items()}
    head = state.head["w"].clone()
    for u in out.accepted:
        p = payloads[u.client]
        dB, dA = {}, {}
        for n, f in u.lora.items():
            f0, r = p.lora[n], f.rank
            dB[n] = torch.zeros_like(B[n])
            dA[n] = torch.zeros_like(A[n])
            if name == "ffa":
                dB[n][:, :r] = f.scale * (f.B - f0.B)
            elif name == "fedit":
                dB[n][:, :r], dA[n][:r] = f.B - f0.B, f.scale * (f.A - f0.A)
            else:
                dA[n][:r] = f.scale * (f.A - f0.A)
        dh = u.head["w"] - p.head["w"]
        norm = math.sqrt(sum(float((t**2).sum()) for t in [*dB.values(), *dA.values(), dh]))
        c = min(1.0, C / norm)
        for n in B:
            B[n] += c / m * dB[n]
            A[n] += c / m * dA[n]
        head += c / m * dh
    return B, A, head


@pytest.mark.parametrize("name,ranks", [("ffa", [2, 4, 3, 4, 2]), ("fedit", [4] * 5), ("rolora", [2, 4, 3, 4, 2])])
def test_a_factor_dp_round_with_noise_0_is_the_clipped_average_of_the_factor_changes(name, ranks):
    C = 0.8
    strategy, state, out, payloads = factor_dp_round(name, C, 0.0, ranks)
    assert [r["client"] for r in out.rejected] == [4] and 3 in [c["client"] for c in out.clipped]
    B, A, head = factor_reference(name, state, out, payloads, C)
    for n, f in out.state.lora.items():
        torch.testing.assert_close(f.B, B[n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(f.A, A[n], rtol=1e-12, atol=1e-12)
        if name == "ffa":  # A is never trained, so never released anew
            assert torch.equal(f.A, state.lora[n].A)
        if name == "rolora":  # an A round: B stays
            assert torch.equal(f.B, state.lora[n].B)
    torch.testing.assert_close(out.state.head["w"], head, rtol=1e-12, atol=1e-12)


def test_factor_dp_noise_has_the_stated_std_on_the_trained_factor_only_and_avgm_steps_with_it():
    C, z, m = 0.8, 2.0, 5
    strategy, state, out, payloads = factor_dp_round("ffa", C, z, [2, 4, 3, 4, 2])
    B, A, head = factor_reference("ffa", state, out, payloads, C)
    noise = torch.cat([(out.state.lora[n].B - B[n]).flatten() for n in B] + [(out.state.head["w"] - head).flatten()])
    assert float(noise.std()) == pytest.approx(z * C / m, rel=0.15)  # 12*4 + 7*4 + 10 = 86 draws
    assert all(torch.equal(out.state.lora[n].A, state.lora[n].A) for n in A)
    _, _, again, _ = factor_dp_round("ffa", C, z, [2, 4, 3, 4, 2], server_opt=ServerOpt("avgm", lr=2.0))
    for n, f in again.state.lora.items():  # avgm from zero momentum: x + 2 D, with the same noise
        torch.testing.assert_close(f.B, state.lora[n].B + 2 * (out.state.lora[n].B - state.lora[n].B))


def test_a_factor_dp_run_on_the_tiny_model(tiny_args, tmp_path):
    from hlora import run

    res = run(tiny_config(tiny_args, tmp_path / "ffa", strategy="ffa", rounds=2, dp_clip=0.05,
                          dp_epsilon_target=20.0))
    assert [r["dp_epsilon"] for r in res.rows] == sorted(r["dp_epsilon"] for r in res.rows)
    assert all(r["clipped"] for r in res.rows) and 0 <= res.summary["final_accuracy"] <= 1


# --- a DP run on the tiny model, and its resume -------------------------------------------------------


def test_a_dp_run_records_epsilon_every_round_and_resumes_to_the_same_rows(tiny_args, tmp_path):
    from hlora import run
    from hlora.checkpoint import load_checkpoint
    from hlora.engine.simulation import resume

    extra = dict(dp_clip=0.05, dp_epsilon_target=20.0, server_momentum=0.5)  # the momentum is checkpointed too
    ref = run(tiny_config(tiny_args, tmp_path / "ref", **extra))
    saved = yaml.safe_load((tmp_path / "ref" / "config.yaml").read_text())
    q, delta = 2 / 4, 4**-1.1
    z = calibrate_noise(q, 2, 20.0, delta)
    assert saved["dp_noise"] == pytest.approx(z) and saved["dp_delta"] == pytest.approx(delta)
    assert [r["dp_epsilon"] for r in ref.rows] == [spent_epsilon(q, z, t, delta) for t in (1, 2)]
    assert ref.rows[0]["dp_epsilon"] < ref.rows[1]["dp_epsilon"] <= 20.0
    assert all(r["clipped"] for r in ref.rows)  # C = 0.05: every client is clipped
    summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert summary["dp_epsilon"] == ref.rows[-1]["dp_epsilon"]

    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tiny_args, tmp_path / "cut", **extra), StopAfter(1))
    res = resume(tmp_path / "cut")  # config.yaml holds both the target and the z it resolved to
    assert _strip(res.rows) == _strip(ref.rows)
    assert res.summary["dp_epsilon"] == summary["dp_epsilon"]
    a, _ = load_checkpoint(tmp_path / "cut")
    b, _ = load_checkpoint(tmp_path / "ref")
    strategy = get_strategy("hlora")
    assert a.extra["server_opt"].keys() == b.extra["server_opt"].keys() and a.extra["server_opt"]
    for m, f in strategy.global_adapter(b).items():
        assert torch.equal(strategy.global_adapter(a)[m].delta(), f.delta())


def test_noise_changes_the_run_and_no_noise_reports_no_epsilon(tiny_args, tmp_path):
    from hlora import run

    clip_only = run(tiny_config(tiny_args, tmp_path / "a", rounds=1, dp_clip=0.05, dp_noise=0.0))
    noisy = run(tiny_config(tiny_args, tmp_path / "b", rounds=1, dp_clip=0.05, dp_noise=5.0))
    assert clip_only.rows[0]["dp_epsilon"] is None  # clipping alone: no privacy
    assert noisy.rows[0]["eval_loss"] != clip_only.rows[0]["eval_loss"]


# --- adaptive clipping (Andrew et al. 2021) ------------------------------------------------------------


def test_adaptive_clipping_splits_z_between_the_average_and_the_count():
    dp = DP(clip=1.0, noise=0.861, adaptive=0.5)
    z_d = dp.update_noise(20)  # sigma_b = 20 / 20 = 1: z_D = (0.861^-2 - 2^-2)^-1/2 = 0.95393 (by hand)
    assert z_d == pytest.approx(0.95393, abs=1e-5)
    assert z_d ** -2 + (2 * dp.count_std(20)) ** -2 == pytest.approx(0.861 ** -2)  # one mechanism of multiplier z
    assert dp.std(20, clip=2.0) == pytest.approx(z_d * 2.0 / 20)
    assert DP(clip=1.0, noise=0.861).std(20) == pytest.approx(0.861 / 20)  # fixed clip: z whole
    assert DP(clip=1.0, noise=0.0, adaptive=0.5).std(20) == 0.0 and DP(noise=0.0).count_std(20) == 0.0
    clip_only = DP(clip=1.0, noise=0.0, adaptive=0.5).check(strategy="hlora", clients=100, per_round=20, rounds=3)
    assert clip_only.count_std(20) == 0.0  # clipping only (no privacy): the clip still adapts, noiselessly


def test_without_noise_the_clip_takes_its_geometric_step():
    dp = DP(clip=1.0, noise=0.0, adaptive=0.3)
    g = torch.Generator().manual_seed(0)
    assert dp.next_clip(2.0, 20, 20, g) == pytest.approx(2.0 * math.exp(-0.2 * (1.0 - 0.3)))  # all within: shrink
    assert dp.next_clip(2.0, 0, 20, g) == pytest.approx(2.0 * math.exp(0.2 * 0.3))  # none within: grow
    assert dp.next_clip(2.0, 6, 20, g) == pytest.approx(2.0)  # exactly the target share: stay


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.8])
def test_the_clip_finds_the_target_quantile_of_the_norms_through_its_noisy_count(quantile):
    """Norms 1..20 every round, from C = 100 and C = 0.1: after 150 rounds the noisy count has brought C to
    the quantile's norm (up to the step's wobble and the count's noise, sigma_b = 1 at m = 20)."""
    dp = DP(clip=1.0, noise=1.0, adaptive=quantile)
    norms = torch.arange(1, 21, dtype=torch.float64)
    for start in (100.0, 0.1):
        clip, seen = start, []
        for t in range(300):
            within = int((norms <= clip).sum())
            clip = dp.next_clip(clip, within, 20, torch.Generator().manual_seed(t))
            seen.append(clip)
        late = sorted(seen[150:])
        assert quantile * 20 - 3 < late[len(late) // 2] < quantile * 20 + 3


def test_an_adaptive_run_records_its_clip_every_round_and_resumes_to_the_same_rows(tiny_args, tmp_path):
    from hlora import run
    from hlora.checkpoint import load_checkpoint
    from hlora.engine.simulation import resume

    extra = dict(dp_clip=0.05, dp_noise=0.1, dp_adaptive_clip=0.5, rounds=3)  # z < per-round / 10 = 0.2
    ref = run(tiny_config(tiny_args, tmp_path / "ref", **extra))
    clips = [r["dp_clip"] for r in ref.rows]
    assert clips[0] == 0.05 and clips[1] > clips[0] and clips[2] > clips[1]  # C = 0.05 clips all: it grows
    assert all(r["dp_epsilon"] == spent_epsilon(0.5, 0.1, r["round"], 4**-1.1) for r in ref.rows)  # z, whole
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tiny_args, tmp_path / "cut", **extra), StopAfter(2))
    res = resume(tmp_path / "cut")
    assert _strip(res.rows) == _strip(ref.rows)
    a, _ = load_checkpoint(tmp_path / "cut")
    assert a.extra[CLIP_KEY] == load_checkpoint(tmp_path / "ref")[0].extra[CLIP_KEY]


# --- refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dp-clip", "1", "--dp-noise", "1", "--dp-epsilon-target", "3"],
         "give --dp-noise or --dp-epsilon-target, not both"),
        (["--dp-clip", "-1"], "--dp-clip must be >= 0"),
        (["--dp-clip", "1", "--dp-noise", "-1"], "--dp-noise must be >= 0"),
        (["--dp-clip", "1", "--dp-epsilon-target", "0"], "--dp-epsilon-target must be > 0"),
        (["--dp-clip", "1", "--dp-noise", "1", "--dp-delta", "2"], "--dp-delta must be in (0, 1)"),
        (["--dp-noise", "1"], "--dp-noise need --dp-clip C"),
        (["--dp-clip", "1"], "--dp-clip needs --dp-noise z or --dp-epsilon-target EPS"),
        (["--dp-clip", "1", "--dp-noise", "1", "--strategy", "lorafair"],
         "--dp-clip is not defined for lorafair: LoRA-FAIR's correction is a least-squares fit"),
        (["--dp-clip", "1", "--dp-noise", "1", "--strategy", "hetlora"], "--dp-clip is not defined for hetlora"),
        (["--dp-clip", "1", "--dp-noise", "1", "--strategy", "fedex"], "--dp-clip is not defined for fedex"),
        (["--dp-clip", "1", "--dp-noise", "1", "--strategy", "flora"], "--dp-clip is not defined for flora"),
        (["--dp-clip", "1", "--dp-noise", "1", "--strategy", "fedsa"], "--dp-clip is not defined for fedsa"),
        (["--dp-clip", "1", "--dp-noise", "1", "--strategy", "centralized"],
         "pools the clients' data: there are no client updates to protect"),
        (["--dp-clip", "1", "--dp-noise", "1", "--robust", "normclip"], "cannot run with --robust normclip"),
        (["--dp-clip", "1", "--dp-noise", "1", "--client-weights", "examples"],
         "--dp-clip needs --client-weights uniform"),
        (["--dp-clip", "1", "--dp-noise", "1", "--dp-dense-mb", "0"], "--dp-dense-mb must be > 0"),
        (["--dp-clip", "1", "--dp-noise", "0.1", "--dp-adaptive-clip", "1"],
         "--dp-adaptive-clip is the target quantile of the change norms, in (0, 1)"),
        (["--dp-clip", "1", "--dp-noise", "2", "--dp-adaptive-clip", "0.5"],
         "z must be below per-round / 10 = 2, got 2"),
        (["--dp-adaptive-clip", "0.5"], "--dp-adaptive-clip need --dp-clip C"),
    ],
)
def test_bad_dp_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    code, text = run_cli(["run", *argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert message in " ".join(text.split())
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_module_above_the_dense_budget_is_refused_before_training(capsys, tmp_path, tiny_args):
    code, text = run_cli(["run", *tiny_args, "--dp-clip", "1", "--dp-noise", "1", "--dp-dense-mb", "0.01",
                          "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "32 x 32 at" in text
    assert "needs 0.0352 MB, above --dp-dense-mb 0.01" in " ".join(text.split())
    assert not (tmp_path / "o").exists()


def test_dp_errors_are_config_errors():
    with pytest.raises(PrivacyError):
        DP(clip=1.0).check(strategy="hlora", clients=10, per_round=2, rounds=3)
    assert issubclass(PrivacyError, ValueError)
    with pytest.raises(ConfigError, match="--dp-clip needs --dp-noise"):
        from hlora.config import load_config

        load_config(None, {"dp_clip": 1.0})


# --- Flower: the same DP round as the simulation --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("adaptive", [False, True])
def test_a_dp_run_on_flower_equals_the_simulation(adaptive, tmp_path, tiny_model, tiny_mrpc):
    """Three nodes holding partition ids are the simulation's clients 0..2; the server clips and draws the
    noise from (seed, round), so a Flower DP run computes what ``hlora run`` computes, epsilon included."""
    pytest.importorskip("flwr")
    from hlora.checkpoint import load_checkpoint
    from tests.test_flower import assert_same_adapter, flower_and_simulation

    options = {"dp-clip": 0.05, "dp-noise": 0.5, "client-weights": "uniform", "per-round": 2, "rounds": 2}
    if adaptive:  # C moves with the count; z below per-round / 10
        options.update({"dp-adaptive-clip": 0.5, "dp-noise": 0.1})
    out, sim = flower_and_simulation(tmp_path, tiny_model, tiny_mrpc, **options)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(sim.rows) == 2
    assert (rows[1]["dp_clip"] != rows[0]["dp_clip"]) == adaptive
    for got, expected in zip(rows, sim.rows):
        for key in ("round", "clients", "accuracy", "rejected", "dp_epsilon", "dp_clip"):
            assert got[key] == expected[key], key
        assert [c["client"] for c in got["clipped"]] == [c["client"] for c in expected["clipped"]]
        assert got["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5, abs=1e-7)
    assert json.loads((out / "summary.json").read_text())["dp_epsilon"] == sim.summary["dp_epsilon"]
    strategy = get_strategy("hlora")
    mine, _ = load_checkpoint(out)
    theirs, _ = load_checkpoint(sim.out)
    assert_same_adapter(strategy.global_adapter(mine), strategy.global_adapter(theirs), 1e-4, 1e-6)


def test_factor_dp_without_clipping_or_noise_is_the_plain_uniform_rule_from_round_one():
    """From B = 0 (fedit's dispatch re-seeds every rank of A) and for ffa and rolora, a DP round with a huge C,
    no noise and every client valid is the strategy's own uniform average."""
    g = torch.Generator().manual_seed(4)
    for name, ranks in (("fedit", [4] * 3), ("ffa", [4] * 3), ("rolora", [4] * 3)):
        strategy = get_strategy(name)
        init = {m: Factor(torch.zeros(d, 4, dtype=torch.float64),
                          torch.randn(4, k, generator=g, dtype=torch.float64), 1.0) for m, (d, k) in SHAPES.items()}
        state = strategy.init_state(init, {"w": torch.zeros(2, 5, dtype=torch.float64)})
        clients = [ClientSpec(i, dict.fromkeys(SHAPES, r), 16.0, 5) for i, r in enumerate(ranks)]

        def execute(pairs):
            return [Update(s.id, {m: Factor(f.B + 0.1 * torch.randn(f.B.shape, generator=g, dtype=torch.float64)
                                            if p.train_B else f.B,
                                            f.A + 0.1 * torch.randn(f.A.shape, generator=g, dtype=torch.float64)
                                            if p.train_A else f.A, f.scale) for m, f in p.lora.items()},
                           {"w": p.head["w"] + 0.1}, 5, dict(p.info)) for s, p in pairs]

        gen = torch.Generator().manual_seed(9)
        state_g = gen.get_state()
        dp = server_round(strategy, state, clients, execute, round=1, seed=0, dp=DP(clip=1e9, noise=0.0),
                          client_weights="uniform")
        gen.set_state(state_g)
        plain = strategy.aggregate(state, dp.accepted)
        for m in SHAPES:
            torch.testing.assert_close(dp.state.lora[m].B, plain.lora[m].B, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(dp.state.lora[m].A, plain.lora[m].A, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dp.state.head["w"], plain.head["w"], rtol=1e-12, atol=1e-12)


def test_under_factor_dp_a_rank_no_client_holds_keeps_its_value():
    """ffa's own rule zero-pads B above every client's rank (the column's value would then depend on which
    clients were sampled); under DP (no noise) those columns keep their value, and the held ones move by the
    clients' mean change."""
    strategy, state, out, payloads = factor_dp_round("ffa", 1e9, 0.0, [2, 2, 2, 2, 2], R=4)
    B, A, head = factor_reference("ffa", state, out, payloads, 1e9)
    for n, f in out.state.lora.items():
        assert torch.equal(f.B[:, 2:], state.lora[n].B[:, 2:]) and bool(state.lora[n].B[:, 2:].any())
        torch.testing.assert_close(f.B, B[n], rtol=1e-12, atol=1e-12)
    plain = strategy.aggregate(state, out.accepted)
    assert all(not bool(f.B[:, 2:].any()) for f in plain.lora.values())  # the plain rule zero-pads them
