"""Robust aggregation (hlora.robust) and simulated attacks (hlora.attacks): tensors against dense float64
references, the refusals, and a sign-flip attacker on the tiny model."""

import math

import numpy as np
import pytest
import torch

import hlora.engine.simulation as sim
from hlora import run
from hlora.attacks import Attack, choose_attackers, flip_labels, noise_change, scale_change
from hlora.config import ConfigError, load_config
from hlora.factors import Factor
from hlora.objectives import label_counts, offset_from_counts
from hlora.robust import (
    Robust,
    RobustError,
    change_gram,
    clip_update,
    coordinate_median,
    distances_to_center,
    pairwise_sq_distances,
    trimmed_mean,
)
from hlora.server import server_round
from hlora.strategies import ClientSpec, Payload, Update, get_strategy
from tests.test_run import tiny_config

SHAPES = {"q": (12, 9), "v": (7, 10)}


def client_pair(g: torch.Generator, client: int, rank: int, step: float = 0.3, start: bool = True):
    """A payload (B0 nonzero unless ``start`` is False) and an update that moved both factors and the head
    (float64, so that exact identities hold to rounding)."""
    s = 16.0 / rank

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    lora0, lora = {}, {}
    for m, (d, k) in SHAPES.items():
        B0 = randn(d, rank) if start else torch.zeros(d, rank, dtype=torch.float64)
        A0 = randn(rank, k)
        lora0[m] = Factor(B0, A0, s)
        lora[m] = Factor(B0 + step * randn(d, rank), A0 + step * randn(rank, k), s)
    h0 = {"w": randn(2, 5), "b": randn(2)}
    h = {n: t + step * randn(*t.shape) for n, t in h0.items()}
    return Payload(lora0, h0), Update(client, lora, h, 10 + client)


def dense_change(u: Update, p: Payload) -> torch.Tensor:
    """Delta_k flattened over modules and head, in float64 from the dense products."""
    parts = [(u.lora[m].scale * u.lora[m].B.double() @ u.lora[m].A.double()
              - p.lora[m].scale * p.lora[m].B.double() @ p.lora[m].A.double()).flatten() for m in SHAPES]
    parts += [(u.head[n].double() - p.head[n].double()).flatten() for n in p.head]
    return torch.cat(parts)


def round_of(ranks, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    pairs = [client_pair(g, i, r, **kw) for i, r in enumerate(ranks)]
    return [u for _, u in pairs], [p for p, _ in pairs]


def test_factored_distances_equal_dense_float64():
    updates, sent = round_of([2, 5, 3, 8, 1])
    D = pairwise_sq_distances(change_gram(updates, sent))
    X = torch.stack([dense_change(u, p) for u, p in zip(updates, sent)])
    torch.testing.assert_close(D, torch.cdist(X, X) ** 2, rtol=1e-9, atol=1e-9)
    assert D.dtype == torch.float64 and torch.all(D.diagonal() == 0)


def attacked_round(honest=5, attackers=(5, 6), spread=0.05):
    """Honest changes near one common change; the attackers send it sign-flipped and scaled."""
    g = torch.Generator().manual_seed(1)
    base = {m: (torch.randn(d, 2, generator=g), torch.randn(2, k, generator=g)) for m, (d, k) in SHAPES.items()}
    updates, sent = [], []
    for i in range(honest + len(attackers)):
        sign = -3.0 if i in attackers else 1.0
        lora0 = {m: Factor(torch.zeros(d, 2), base[m][1], 1.0) for m, (d, k) in SHAPES.items()}
        lora = {m: Factor(sign * (B + spread * torch.randn(B.shape, generator=g)), A, 1.0)
                for m, (B, A) in base.items()}
        sent.append(Payload(lora0, {}))
        updates.append(Update(i, lora, {}, 10))
    return updates, sent


def test_multikrum_removes_the_attackers_and_krum_keeps_one_honest_client():
    updates, sent = attacked_round()
    verdict = Robust("multikrum", f=2).check(per_round=7).judge(updates, sent)
    assert sorted(verdict.rejected) == [5, 6] and "multikrum: score" in verdict.rejected[5]
    assert sorted(Robust("multikrum", f=2, m=3).judge(updates, sent).rejected)[-2:] == [5, 6]
    krum = Robust("krum", f=2).judge(updates, sent)
    assert len(krum.rejected) == 6 and {5, 6} <= set(krum.rejected)


def test_median_and_trimmed_equal_dense_references_and_remove_the_farthest():
    X = torch.randn(7, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = np.median(X.numpy(), axis=0)
    torch.testing.assert_close(coordinate_median(X), torch.from_numpy(ref))
    torch.testing.assert_close(coordinate_median(X[:6]), torch.from_numpy(np.median(X[:6].numpy(), axis=0)))
    srt = np.sort(X.numpy(), axis=0)
    torch.testing.assert_close(trimmed_mean(X, 2), torch.from_numpy(srt[2:5].mean(0)))
    with pytest.raises(RobustError, match="cannot drop 4 on each side"):
        trimmed_mean(X, 4)

    updates, sent = round_of([2, 4, 3, 2, 5], step=0.2)
    dense = torch.stack([dense_change(u, p) for u, p in zip(updates, sent)])
    for center, ref_center in ((coordinate_median, dense.median(0).values), (lambda x: trimmed_mean(x, 1), None)):
        got = distances_to_center(updates, sent, center)
        if ref_center is None:
            ref_center = dense.sort(0).values[1:4].mean(0)
        torch.testing.assert_close(got, (dense - ref_center).norm(dim=1), rtol=1e-5, atol=1e-6)

    updates, sent = attacked_round()
    for rule in ("median", "trimmed"):
        verdict = Robust(rule, f=2).check(per_round=7).judge(updates, sent)
        assert sorted(verdict.rejected) == [5, 6] and "coordinate-wise" in verdict.rejected[6]


def test_normclip_bounds_the_change_exactly_in_product_space_and_for_a_frozen_factor():
    updates, sent = round_of([2, 4, 3, 6, 5])
    norms = change_gram(updates, sent).diagonal().sqrt()
    tau = float(norms.median())
    verdict = Robust("normclip").judge(updates, sent)
    assert sorted(verdict.scales) == [i for i in range(5) if norms[i] > tau]
    for i, c in verdict.scales.items():
        clipped = clip_update(updates[i], sent[i], c, products=True)
        assert clipped.lora["q"].rank == 2 * updates[i].lora["q"].rank  # [c B, (1 - c) B0]
        torch.testing.assert_close(dense_change(clipped, sent[i]).norm().item(), tau, rtol=1e-12, atol=0)
        torch.testing.assert_close(dense_change(clipped, sent[i]), c * dense_change(updates[i], sent[i]))
    fixed = Robust("normclip", clip=0.5).judge(updates, sent)
    assert len(fixed.scales) == 5
    assert all(math.isclose(c, 0.5 / float(n)) for c, n in zip(fixed.scales.values(), norms))
    # factor space with A frozen (ffa, rolora's B rounds): B0 + c dB is exactly c Delta
    u, p = updates[0], sent[0]
    frozen_A = Update(0, {m: Factor(f.B, p.lora[m].A, f.scale) for m, f in u.lora.items()}, u.head, 1)
    clipped = clip_update(frozen_A, p, 0.25, products=False)
    torch.testing.assert_close(dense_change(clipped, p), 0.25 * dense_change(frozen_A, p))


def test_normclip_in_a_round_aggregates_the_clipped_updates_with_hloras_rule():
    strategy = get_strategy("hlora")
    g = torch.Generator().manual_seed(3)
    init = {m: Factor(torch.zeros(d, 4), torch.randn(4, k, generator=g), 1.0) for m, (d, k) in SHAPES.items()}
    start = strategy.init_state(init, {"w": torch.zeros(2, 5)})
    first = {m: Factor(torch.randn(d, 4, generator=g), init[m].A, 2.0) for m, (d, k) in SHAPES.items()}
    state = strategy.aggregate(start, [Update(0, first, start.head, 1)])  # a global update: B0 != 0
    clients = [ClientSpec(i, dict.fromkeys(SHAPES, r), 8.0, 5) for i, r in enumerate([2, 4, 3, 4])]
    bumps = [1.0, 1.0, 1.0, 20.0]

    def execute(pairs):
        return [Update(spec.id, {m: Factor(f.B + bump * 0.1 * torch.randn(f.B.shape, generator=g), f.A, f.scale)
                                 for m, f in p.lora.items()}, {"w": p.head["w"] + 0.1}, 5)
                for (spec, p), bump in zip(pairs, bumps)]

    out = server_round(strategy, state, clients, execute, round=1, seed=0, max_norm_ratio=0,
                       robust=Robust("normclip", clip_ratio=2.0))
    assert [c["client"] for c in out.clipped] == [3] and not out.rejected
    expected = {m: 0 for m in SHAPES}
    payloads = [strategy.dispatch(state, spec, torch.Generator().manual_seed(0)) for spec in clients]
    for u, p in zip(out.accepted, payloads):
        c = out.clipped[0]["scale"] if u.client == 3 else 1.0
        for m in SHAPES:
            expected[m] = expected[m] + 0.25 * (p.lora[m].delta() + c * (u.lora[m].delta() - p.lora[m].delta()))
    got = strategy.global_adapter(out.state)
    for m in SHAPES:
        torch.testing.assert_close(got[m].delta(), expected[m], rtol=1e-4, atol=1e-5)


def test_options_out_of_range_are_refused_with_one_line():
    with pytest.raises(RobustError, match=r"needs --per-round > 2 \* --robust-f \+ 2"):
        Robust("krum", f=1).check(per_round=4)
    with pytest.raises(RobustError, match="--robust-m applies to --robust multikrum only"):
        Robust("krum", m=3).check(per_round=10)
    with pytest.raises(RobustError, match="fewer than half"):
        Robust("median", f=3).check(per_round=6)
    with pytest.raises(RobustError, match="must be one of none, krum"):
        Robust("bulyan").check(per_round=10)
    shapes = {"layer.0.query": (4096, 4096)}
    Robust("krum").check_dense(shapes, 20)  # factored: no dense budget
    with pytest.raises(RobustError, match=r"20 clients x 4096 x 4096 at layer.0.query need 5120 MB, above "
                                          r"--robust-dense-mb 2048; use krum, multikrum or normclip"):
        Robust("median").check_dense(shapes, 20)
    Robust("trimmed", dense_mb=6000).check_dense(shapes, 20)
    cases = [
        ({"robust": "multikrum", "per_round": 4}, "needs --per-round > 2"),
        ({"robust": "trimmed", "robust_trim": 0.5}, "--robust-trim"),
        ({"robust": "krum", "strategy": "centralized"}, "pools their data"),
        ({"attack": "signflip", "attackers": 1.0}, r"in \[0, 1\)"),
        ({"attackers": 0.2}, "need --attack"),
        ({"attack": "labelflip", "attack_lambda": 2.0}, "--attack-lambda applies to"),
        ({"attack": "labelflip", "task": "instruct"}, "classification tasks only"),
        ({"attack": "backdoor"}, "--attack must be one of"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message) as e:
            load_config(None, {"clients": 10, "per_round": 10, **overrides})
        assert "\n" not in str(e.value)


def test_the_flower_engine_refuses_attacks_and_takes_robust_rules():
    from hlora.engine.flower.settings import run_settings

    assert run_settings({"robust": "multikrum", "robust-f": 0})[0].robust_rule().rule == "multikrum"
    with pytest.raises(ConfigError, match="attacks are simulated by hlora run only"):
        run_settings({"attack": "signflip"})


def test_attacks_on_the_factors():
    g = torch.Generator().manual_seed(4)
    p, u = client_pair(g, 0, 3, step=0.01)
    honest = dense_change(u, p)
    flipped = dense_change(scale_change(u, p, -2.0), p)  # -2 Delta to first order
    assert torch.nn.functional.cosine_similarity(flipped, -2 * honest, dim=0) > 0.999
    frozen_A = Update(0, {m: Factor(f.B, p.lora[m].A, f.scale) for m, f in u.lora.items()}, u.head, 1)
    torch.testing.assert_close(dense_change(scale_change(frozen_A, p, -2.0), p), -2 * dense_change(frozen_A, p))
    noisy = noise_change(u, p, 1.0, torch.Generator().manual_seed(0))
    for m in SHAPES:
        want = (u.lora[m].delta() - p.lora[m].delta()).norm()
        torch.testing.assert_close((noisy.lora[m].delta() - p.lora[m].delta()).norm(), want, rtol=1e-4, atol=0)
        assert torch.equal(noisy.lora[m].A, p.lora[m].A)
    torch.testing.assert_close((noisy.head["w"] - p.head["w"]).norm(), (u.head["w"] - p.head["w"]).norm())
    chosen = choose_attackers(20, 0.2, seed=0)
    assert chosen == choose_attackers(20, 0.2, seed=0) and len(chosen) == 4
    assert choose_attackers(20, 0.2, seed=0) != choose_attackers(20, 0.2, seed=1)
    assert flip_labels(torch.tensor([0, 1, 1]), 2).tolist() == [1, 0, 0]
    attack = Attack("signflip", [3, 7], 1.0, 0)
    assert attack.row([1, 3, 5], [{"client": 3, "reason": "x"}, {"client": 5, "reason": "y"}]) == {
        "attackers": [3], "true_rejections": [3], "false_rejections": [5]}


def test_a_sign_flip_attacker_that_wins_under_none_is_removed_under_multikrum(tiny_args, tmp_path, monkeypatch):
    attack = dict(clients=6, per_round=6, rounds=2, attack="signflip", attackers=0.17, attack_lambda=3.0)
    plain = run(tiny_config(tiny_args, tmp_path / "none", **attack))
    (attacker,) = plain.rows[0]["attackers"]
    for row in plain.rows:
        assert row["rejected"] == [] and row["attackers"] == [attacker] and row["true_rejections"] == []
    robust = run(tiny_config(tiny_args, tmp_path / "multikrum", robust="multikrum", **attack))
    for row in robust.rows:
        assert [r["client"] for r in row["rejected"]] == [attacker]
        assert row["rejected"][0]["reason"].startswith("multikrum: score")
        assert row["true_rejections"] == [attacker] and row["false_rejections"] == []

    real = sim.train_client

    def absent(*args, **kwargs):
        if kwargs["client_id"] == attacker:
            raise RuntimeError("dropped")
        return real(*args, **kwargs)

    monkeypatch.setattr(sim, "train_client", absent)
    honest = run(tiny_config(tiny_args, tmp_path / "honest", clients=6, per_round=6, rounds=2))
    # multikrum's model is the honest clients' model; under none the attacker moved it
    assert [r["eval_loss"] for r in robust.rows] == [r["eval_loss"] for r in honest.rows]
    assert [r["eval_loss"] for r in plain.rows] != [r["eval_loss"] for r in honest.rows]


@pytest.mark.parametrize("attack,robust", [("labelflip", "trimmed"), ("noise", "normclip"), ("scale", "median"),
                                           ("signflip", "krum")])
def test_every_attack_and_rule_runs_on_the_tiny_model(attack, robust, tiny_args, tmp_path):
    res = run(tiny_config(tiny_args, tmp_path / robust, clients=6, per_round=6, rounds=1, attack=attack,
                          attackers=0.34, robust=robust))
    (row,) = res.rows
    assert len(row["attackers"]) == 2 and math.isfinite(row["accuracy"])
    by_rule = [r for r in row["rejected"] if r["reason"].startswith(f"{robust}:")]
    assert len(by_rule) == {"trimmed": 1, "median": 1, "krum": 5, "normclip": 0}[robust]
    assert sorted(row["true_rejections"] + row["false_rejections"]) == sorted(r["client"] for r in row["rejected"])
    if robust == "normclip":
        assert row["clipped"] and all(0 < c["scale"] < 1 for c in row["clipped"])


def test_a_label_flipping_attacker_trains_on_flipped_labels_with_their_label_mix(tiny_args, tmp_path):
    exp = sim.setup(tiny_config(tiny_args, tmp_path / "x", clients=6, per_round=6, attack="labelflip",
                                attackers=0.34))
    bad, good = exp.attack.attackers[0], next(c for c in range(6) if c not in exp.attack.attackers)
    assert exp.training_set(good) is exp.train
    assert torch.equal(exp.training_set(bad).labels, 1 - exp.train.labels)
    labels = exp.train.labels
    flipped = label_counts(1 - labels[exp.parts[bad]], 2)
    torch.testing.assert_close(exp.offsets[bad], offset_from_counts(flipped, label_counts(labels, 2), 1.0))
