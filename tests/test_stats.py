"""hlora.stats against hand-computed values, and hlora.report's table on a hand-written toy grid."""

import builtins
import csv
import json
import math

import pytest

from hlora.report import summarize, write_tables
from hlora.stats import T975, paired_bootstrap, paired_seeds, spread, t_quantile


def test_spread_is_mean_sample_std_min_max_and_skips_nan():
    s = spread([0.50, 0.52, 0.51, math.nan])
    assert (s.mean, s.low, s.high, s.n) == (pytest.approx(0.51), 0.50, 0.52, 3)
    assert s.std == pytest.approx(0.01)  # sqrt((0.01^2 + 0.01^2 + 0) / 2)
    assert spread([0.7]).std == 0.0
    assert math.isnan(spread([math.nan]).mean) and spread([]).n == 0


def test_paired_seeds_by_hand():
    # d = (0.02, 0.01, 0.04): mean 0.07/3; deviations -1/300, -4/300, 5/300; sum of squares 42/90000
    d = paired_seeds([0.70, 0.72, 0.74], [0.68, 0.71, 0.70])
    std = math.sqrt(42 / 90000 / 2)
    assert d.estimate == pytest.approx(0.07 / 3) and d.std == pytest.approx(std) and d.n == 3
    half = 4.302653 * std / math.sqrt(3)  # t_{0.975, 2}
    assert d.low == pytest.approx(0.07 / 3 - half, abs=1e-6) and d.high == pytest.approx(0.07 / 3 + half, abs=1e-6)
    assert (d.low, d.high) == pytest.approx((-0.014612, 0.061279), abs=1e-6)
    assert not d.resolved  # the interval holds 0
    shifted = paired_seeds([0.90, 0.91, 0.93], [0.70, 0.70, 0.70])
    assert shifted.resolved and shifted.low > 0
    one = paired_seeds([0.7], [0.6])
    assert one.estimate == pytest.approx(0.1) and math.isnan(one.low) and not one.resolved
    with pytest.raises(ValueError, match="2 method values but 1"):
        paired_seeds([0.1, 0.2], [0.1])


def test_t_quantile_table_and_expansion_without_scipy(monkeypatch):
    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError("no scipy here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    assert t_quantile(0.975, 2) == 4.302653 and t_quantile(0.975, 30) == 2.042272
    assert t_quantile(0.975, 40) == pytest.approx(2.021075, abs=2e-5)  # published t_{0.975, 40}
    assert t_quantile(0.975, 120) == pytest.approx(1.979930, abs=2e-5)
    with pytest.raises(ValueError, match="need scipy"):
        t_quantile(0.95, 5)


def test_t_table_matches_scipy():
    t = pytest.importorskip("scipy.stats").t
    assert T975 == pytest.approx([t.ppf(0.975, df) for df in range(1, 31)], abs=1e-6)
    assert t_quantile(0.975, 3) == pytest.approx(3.182446, abs=1e-6)


def test_bootstrap_of_equal_differences_has_zero_width():
    every = paired_bootstrap([[1, 1, 1, 1]], [[0, 0, 0, 0]])
    assert (every.estimate, every.low, every.high, every.std) == (1.0, 1.0, 1.0, 0.0) and every.resolved
    same = paired_bootstrap([[1, 0, 1], [0, 1]], [[1, 0, 1], [0, 1]])
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0) and not same.resolved


def test_bootstrap_resamples_within_each_seed_and_averages_over_seeds():
    # seed A: every difference 1; seed B: every difference 0. Resampling within each seed keeps each seed's
    # mean, so every replicate is exactly (1 + 0) / 2; pooling the examples of both seeds would spread it.
    d = paired_bootstrap([[1, 1, 1], [1, 0, 1, 0]], [[0, 0, 0], [1, 0, 1, 0]])
    assert (d.estimate, d.low, d.high, d.std, d.n) == (0.5, 0.5, 0.5, 0.0, 2)


def test_bootstrap_of_two_examples_by_hand():
    # differences (1, 0): a replicate is the mean of 2 draws, 0, 1/2 or 1 with probability 1/4, 1/2, 1/4, so
    # the 2.5% and 97.5% quantiles of 2000 replicates are 0 and 1, and their std is sqrt(1/8).
    d = paired_bootstrap([[1, 0]], [[0, 0]], resamples=2000, seed=3)
    assert d.estimate == 0.5 and (d.low, d.high) == (0.0, 1.0)
    assert d.std == pytest.approx(math.sqrt(1 / 8), abs=0.02)
    assert paired_bootstrap([[1, 0]], [[0, 0]], seed=3) == d  # seeded
    with pytest.raises(ValueError, match="2 method and 3 reference examples"):
        paired_bootstrap([[1, 0]], [[0, 0, 1]])


def _cell(path, accuracies, seconds, correct=None, n=100):
    """A finished run directory: metrics.jsonl with these accuracies; dev_predictions.json where the first
    ``correct`` of ``n`` dev examples are right."""
    path.mkdir(parents=True)
    rows = [{"round": r, "accuracy": a, "uplink_bytes": 1e6, "downlink_bytes": 2e6, "seconds": seconds}
            for r, a in enumerate(accuracies, start=1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text("{}")
    if correct is not None:
        gold = [i % 2 for i in range(n)]
        predicted = [g if i < correct else 1 - g for i, g in enumerate(gold)]
        (path / "dev_predictions.json").write_text(
            json.dumps({"round": len(accuracies), "predicted": predicted, "gold": gold}))
    return path


HLORA = [[0.40, 0.45, 0.48, 0.50, 0.55, 0.50], [0.40, 0.46, 0.49, 0.49, 0.53, 0.52],
         [0.41, 0.44, 0.47, 0.48, 0.49, 0.51]]
FEDIT_FINAL = [0.70, 0.73, 0.74]


def test_table_of_a_toy_grid_by_hand(tmp_path):
    groups = {"hlora": {}, "fedit:ranks=8": {}, "flexlora": {}}
    for s in range(3):
        groups["hlora"][s] = _cell(tmp_path / "hlora" / f"seed{s}", HLORA[s], 10.0, round(100 * HLORA[s][-1]))
        # fedit: right on a superset of hlora's examples; seed 2 from before dev_predictions.json existed
        groups["fedit:ranks=8"][s] = _cell(tmp_path / "fedit" / f"seed{s}", [0.45] * 5 + [FEDIT_FINAL[s]], 20.0,
                                           round(100 * FEDIT_FINAL[s]) if s < 2 else None)
        groups["flexlora"][s] = _cell(tmp_path / "flexlora" / f"seed{s}", HLORA[s], 10.0,
                                      round(100 * HLORA[s][-1]))
    table = summarize(groups, target=0.5)
    write_tables(table, tmp_path, target=0.5)
    hl, fe, fl = (dict(r) for r in csv.DictReader((tmp_path / "table.csv").open()))
    num = lambda r, k: float(r[k])  # noqa: E731
    assert [hl["method"], fe["method"], fl["method"]] == ["hlora", "fedit:ranks=8", "flexlora"]
    assert num(hl, "final_acc") == pytest.approx(0.51) and num(hl, "final_acc_std") == pytest.approx(0.01)
    assert (num(hl, "final_acc_min"), num(hl, "final_acc_max")) == (0.50, 0.52)
    assert num(hl, "best_acc") == pytest.approx(0.53) and num(hl, "best_acc_std") == pytest.approx(0.02)
    # round 5: 0.55, 0.53, 0.49; round 10 and 20 are past the grid's 6 rounds
    assert num(hl, "acc_r5") == pytest.approx(1.57 / 3)
    assert num(hl, "acc_r5_std") == pytest.approx(math.sqrt((0.08**2 + 0.02**2 + 0.10**2) / 9 / 2))
    assert "acc_r10" not in hl
    assert num(hl, "rounds_to_target") == 5.0 and hl["reached_target"] == "3/3"  # rounds 4, 5, 6
    assert (num(hl, "mb_up"), num(hl, "mb_down"), num(hl, "s_per_round")) == (6.0, 12.0, 10.0)
    assert num(fe, "s_per_round") == 20.0 and num(fe, "rounds_to_target") == 6.0
    # the reference has no difference; fedit's per-seed differences are 0.20, 0.21, 0.23
    assert hl["vs"] == "" and hl["resolved"] == "" and math.isnan(num(hl, "seeds_diff"))
    std = math.sqrt(42 / 90000 / 2)
    assert num(fe, "seeds_diff") == pytest.approx(0.64 / 3) and num(fe, "seeds_diff_std") == pytest.approx(std)
    half = 4.302653 * std / math.sqrt(3)
    assert num(fe, "seeds_diff_low") == pytest.approx(0.64 / 3 - half, abs=1e-6)
    assert num(fe, "seeds_diff_high") == pytest.approx(0.64 / 3 + half, abs=1e-6)
    # the bootstrap pairs the two seeds with predictions: (0.20 + 0.21) / 2; 20-odd more examples right of 100
    # leave no replicate near 0
    assert fe["boot_diff_seeds"] == "2" and num(fe, "boot_diff") == pytest.approx(0.205)
    assert 0.1 < num(fe, "boot_diff_low") < 0.205 < num(fe, "boot_diff_high") < 0.3 and fe["resolved"] == "yes"
    # the same predictions as hlora: every difference 0, a zero-width interval at 0, not resolved
    assert [num(fl, k) for k in ("seeds_diff", "seeds_diff_low", "seeds_diff_high")] == [0.0, 0.0, 0.0]
    assert [num(fl, k) for k in ("boot_diff", "boot_diff_low", "boot_diff_high")] == [0.0, 0.0, 0.0]
    assert fl["resolved"] == "no"
    md = (tmp_path / "table.md").read_text()
    assert "| hlora | 3 | 6 | 51.0 ± 1.0 (50.0-52.0) | 53.0 ± 2.0 (51.0-55.0) | 52.3 ± 3.1 | 5.0 (3/3) |" in md
    assert "acc @5" in md and "acc @10" not in md and "rounds to 50%" in md
    assert "| +21.3 ± 1.5 [+17.5, +25.1] | +20.5 [" in md and md.split("fedit:ranks=8")[1].split("\n")[0].endswith("✓ |")
    assert "| +0.0 ± 0.0 [+0.0, +0.0] | +0.0 [+0.0, +0.0] ? |" in md
    assert "✓: the interval excludes 0 (resolved)" in md and "2000 resamples" in md
    # a run whose predictions belong to another round than its last is not paired
    (groups["flexlora"][0] / "dev_predictions.json").write_text(json.dumps({"round": 5, "predicted": [], "gold": []}))
    assert summarize(groups, target=0.5)[2]["boot_diff_seeds"] == 2


def test_the_personal_column_shows_where_a_cell_has_personal_scores(tmp_path):
    """fedsa's cells (and cells run with --personal-eval) carry personal_accuracy: the table gives the last
    scored round's, over seeds; a method without it shows - and no column appears when no cell has it."""
    groups = {"hlora": {}, "fedsa": {}}
    for s, personal in enumerate([0.80, 0.90]):
        groups["hlora"][s] = _cell(tmp_path / "hlora" / f"seed{s}", HLORA[s], 10.0)
        cell = _cell(tmp_path / "fedsa" / f"seed{s}", HLORA[s], 10.0)
        rows = [json.loads(x) for x in (cell / "metrics.jsonl").read_text().splitlines()]
        for r in rows:
            r["personal_accuracy"] = personal - 0.1 if r["round"] < len(rows) else personal
            r["personal_accuracy_prior"] = r["personal_accuracy"] + 0.05
        (cell / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (cell / "summary.json").write_text(json.dumps({"personal_majority": 0.7 + 0.1 * s}))
        groups["fedsa"][s] = cell
    table = summarize(groups, target=0.5)
    assert table[1]["personal_majority"] == pytest.approx(0.75) and math.isnan(table[0]["personal_majority"])
    assert math.isnan(table[0]["personal_acc"])
    assert table[1]["personal_acc"] == pytest.approx(0.85) and table[1]["personal_acc_max"] == pytest.approx(0.90)
    write_tables(table, tmp_path, target=0.5)
    md = (tmp_path / "table.md").read_text()
    assert "| personal acc (%) |" in md and "| 85.0 ± 7.1 (80.0-90.0) |" in md
    assert "majority label scores 75.0% on the same held-out shares" in md
    assert "| personal + prior (%) |" in md and "| 90.0 ± 7.1 (85.0-95.0) |" in md
    assert md.split("| hlora |")[1].split("\n")[0].split(" | ")[4] == "-"  # hlora's personal cell
    write_tables(summarize({"hlora": groups["hlora"]}, target=0.5), tmp_path, target=0.5)
    assert "personal acc" not in (tmp_path / "table.md").read_text()


def test_an_attack_cells_rejections_are_summed_over_rounds_and_seeds(tmp_path):
    """Attackers 1 and 2 of clients 0-4: the table counts the sampled attackers and honest clients, and those
    rejected, over every round and seed; a cell without an attack shows -."""
    groups = {"hlora": {}, "hlora:attack=signflip": {}}
    rounds = [  # (sampled, sampled attackers, rejected attackers, rejected honest)
        [([0, 1, 2], [1, 2], [1], [0]), ([1, 3, 4], [1], [1], [])],
        [([2, 3, 4], [2], [], [3, 4]), ([0, 3, 4], [], [], [])],
    ]
    for s in range(2):
        groups["hlora"][s] = _cell(tmp_path / "plain" / f"seed{s}", HLORA[s][:2], 10.0)
        cell = _cell(tmp_path / "attack" / f"seed{s}", HLORA[s][:2], 10.0)
        rows = [json.loads(x) for x in (cell / "metrics.jsonl").read_text().splitlines()]
        for r, (clients, att, tr, fr) in zip(rows, rounds[s]):
            r.update(clients=clients, attackers=att, true_rejections=tr, false_rejections=fr)
        (cell / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        groups["hlora:attack=signflip"][s] = cell
    plain, attacked = summarize(groups, target=0.5)
    assert plain["attackers_sampled"] == -1
    assert (attacked["attackers_sampled"], attacked["attackers_rejected"]) == (4, 2)
    assert (attacked["honest_sampled"], attacked["honest_rejected"]) == (8, 3)
    write_tables([plain, attacked], tmp_path, target=0.5)
    md = (tmp_path / "table.md").read_text()
    assert "| attackers rejected | honest rejected |" in md and "| 2/4 (50%) | 3/8 (38%) |" in md
    cells = md.split("| hlora |")[1].split("\n")[0].split(" | ")  # seeds, rounds, final, best, the two counts
    assert cells[4:6] == ["-", "-"]


def test_mb_per_point_above_the_majority_class(tmp_path):
    groups = {"hlora": {}, "fedit:ranks=8": {}}
    for s in range(3):
        groups["hlora"][s] = _cell(tmp_path / "hlora" / f"seed{s}", HLORA[s], 10.0)
        groups["fedit:ranks=8"][s] = _cell(tmp_path / "fedit" / f"seed{s}", [0.45] * 5 + [FEDIT_FINAL[s]], 20.0)
    # 6 rounds of 1 MB up and 2 MB down: 18 MB a run; hlora ends 6 points above 45%, fedit 2.17/3 - 0.45 above
    hl, fe = summarize(groups, target=0.5, majority=0.45)
    assert hl["mb_per_point"] == pytest.approx(18 / 6.0)
    assert fe["mb_per_point"] == pytest.approx(18 / (100 * (2.17 / 3 - 0.45)))
    hl, fe = summarize(groups, target=0.5, majority=0.6)  # hlora's 51% buys nothing above 60%
    assert math.isnan(hl["mb_per_point"]) and fe["mb_per_point"] == pytest.approx(18 / (100 * (2.17 / 3 - 0.6)))
    write_tables([hl, fe], tmp_path, target=0.5, majority=0.6)
    md = (tmp_path / "table.md").read_text()
    assert "| MB up | MB down | MB / pt | s/round |" in md and "majority class (60.0%)" in md
    assert "| 6.0 | 12.0 | - | 10.0 |" in md.split("| hlora |")[1].split("\n")[0]
    assert f"| 6.0 | 12.0 | {18 / (100 * (2.17 / 3 - 0.6)):.1f} | 20.0 |" in md
    assert math.isnan(summarize(groups, target=0.5)[0]["mb_per_point"])  # no majority given: not computed
    write_tables(summarize(groups, target=0.5), tmp_path, target=0.5)
    assert "MB / pt" not in (tmp_path / "table.md").read_text()
