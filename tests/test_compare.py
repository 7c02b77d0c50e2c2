"""hlora compare on a tiny grid (2 methods, 2 rounds, tiny model), and hlora plot."""

import csv
import json

import pytest
from PIL import Image

from hlora.compare import cell_labels, parse_methods
from hlora.plots import spread_labels
from tests.test_cli import run_cli


def test_parse_methods_routes_run_and_strategy_options():
    ms = parse_methods("hlora,hlora:ranks=8,hetlora:norm_weights=true:lr=0.01")
    assert [m.label for m in ms] == ["hlora", "hlora:ranks=8", "hetlora:norm_weights=true:lr=0.01"]
    assert ms[1].overrides == {"ranks": 8}
    assert ms[2].overrides == {"lr": 0.01, "strategy_options": {"norm_weights": True}}
    assert len({m.slug for m in ms}) == 3 and all("/" not in m.slug for m in ms)


def test_a_rank_list_stays_whole_in_a_method():
    ms = parse_methods("hlora:ranks=2,4,8,fedit:ranks=8,flexlora")
    assert [m.label for m in ms] == ["hlora:ranks=2,4,8", "fedit:ranks=8", "flexlora"]
    assert ms[0].overrides == {"ranks": "2,4,8"} or ms[0].overrides == {"ranks": [2, 4, 8]}


@pytest.mark.parametrize("methods, msg", [
    ("hlora,fedavg", "method fedavg: unknown strategy 'fedavg'"),
    ("hlora,hlora:rank=8", "method hlora:rank=8: strategy 'hlora' does not take the option(s) rank"),
    ("hlora,fedit", "method fedit: fedit averages A and B separately"),
])
def test_a_bad_method_fails_before_any_cell_runs(tiny_args, tmp_path, capsys, methods, msg):
    out = tmp_path / "cmp"
    code, text = run_cli(["compare", *tiny_args, "--strategies", methods, "--out", str(out)], capsys)
    assert code == 2 and msg in " ".join(text.split())
    assert not (out / "hlora").exists()


def test_compare_refuses_what_it_cannot_tabulate(tiny_args, tmp_path, capsys):
    code, text = run_cli(["compare", *tiny_args, "--strategies", "hlora", "--out", str(tmp_path / "g"),
                          "--report-only"], capsys)
    assert code == 2 and "no cell of this grid has finished yet" in " ".join(text.split())
    assert not (tmp_path / "g").exists()
    i = tiny_args.index("--task")
    lm = [*tiny_args[:i], "--task", "instruct", *tiny_args[i + 2:]]
    code, text = run_cli(["compare", *lm, "--strategies", "hlora", "--out", str(tmp_path / "lm")], capsys)
    assert code == 2 and "--task instruct runs measure eval loss" in " ".join(text.split())


def test_tiny_compare_writes_every_output_and_skips_finished_cells(tiny_args, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", *tiny_args, "--strategies", "hlora,fedit:ranks=4", "--seeds", "0,1", "--out", str(out),
            "--target", "0.5"]
    code, text = run_cli(argv, capsys)
    assert code in (0, None), text
    assert "cell 4/4" in text
    for slug in ("hlora", "fedit__ranks-4"):
        for seed in (0, 1):
            cell = out / slug / f"seed{seed}"
            assert (cell / "summary.json").exists() and (cell / "adapter" / "adapter_config.json").exists()
            rows = [json.loads(x) for x in (cell / "metrics.jsonl").read_text().splitlines()]
            assert len(rows) == 2
    # same split, client sample and ranks across methods: only the aggregation differs
    a = [json.loads(x) for x in (out / "hlora" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (out / "fedit__ranks-4" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in a] == [r["clients"] for r in b]
    table = list(csv.DictReader((out / "table.csv").open()))
    assert [r["method"] for r in table] == ["hlora", "fedit:ranks=4"]
    hl = table[0]
    finals = [json.loads((out / "hlora" / f"seed{s}" / "summary.json").read_text())["final_accuracy"] for s in (0, 1)]
    assert abs(float(hl["final_acc"]) - sum(finals) / 2) < 1e-9
    assert float(hl["mb_up"]) > 0 and hl["seeds"] == "2"
    md = (out / "table.md").read_text()
    assert "| hlora | 2 | 2 |" in md and "fedit:ranks=4" in md and "final F1" in md
    for fig in ("accuracy.png", "communication.png"):
        with Image.open(out / fig) as im:
            assert im.size[0] > 400 and im.size[1] > 300
    # `hlora plot` on the compare directory names each cell by its method, as the compare figures do
    assert cell_labels(out) == {"hlora": "hlora", "fedit__ranks-4": "fedit:ranks=4"}
    # a second call finds every cell done and only rewrites the tables
    before = (out / "hlora" / "seed0" / "metrics.jsonl").read_text()
    code, text = run_cli(argv, capsys)
    assert text.count("done, skipped") == 4
    assert (out / "hlora" / "seed0" / "metrics.jsonl").read_text() == before
    # --report-only runs nothing: a method not yet run is left out of the tables
    i = argv.index("hlora,fedit:ranks=4")
    code, text = run_cli([*argv[:i], "hlora,fedit:ranks=4,flexlora", *argv[i + 1:], "--report-only"], capsys)
    assert code in (0, None) and "cell" not in text
    assert not (out / "flexlora").exists()
    assert [r["method"] for r in csv.DictReader((out / "table.csv").open())] == ["hlora", "fedit:ranks=4"]
    # the same --out with other settings is another experiment: refused at once, nothing touched
    table_before = (out / "table.csv").read_text()
    code, text = run_cli([*argv, "--lr", "0.02"], capsys)
    assert code == 2 and "was run with other settings: lr" in text and "(now 0.02)" in text
    assert (out / "table.csv").read_text() == table_before
    assert (out / "hlora" / "seed0" / "metrics.jsonl").read_text() == before


def test_majority_share_is_the_dev_sets_most_common_label(tiny_mrpc):
    from hlora.compare import majority_share
    from hlora.config import load_config

    assert majority_share(load_config(None, {"task": "mrpc"})) == pytest.approx(279 / 408)  # MRPC dev: 279 x 1
    assert majority_share(load_config(None, {"task": "rte"})) == pytest.approx(146 / 277)  # RTE dev: 146 entailment
    dev = [line.split("\t")[0] for line in open(tiny_mrpc[1], encoding="utf-8").read().splitlines()[1:]]
    cfg = load_config(None, {"task": "mrpc", "train": tiny_mrpc[0], "dev": tiny_mrpc[1],
                             "text_columns": "#1 String,#2 String", "label_column": "Quality"})
    assert majority_share(cfg) == pytest.approx(max(dev.count("0"), dev.count("1")) / len(dev))


def test_grid_digest_reads_every_finished_cell(tiny_args, tmp_path, capsys):
    from benchmarks.grid_digest import copy_cells, digest

    out = tmp_path / "cmp"
    code, text = run_cli(["compare", *tiny_args, "--strategies", "hlora,flexlora", "--out", str(out)], capsys)
    assert code in (0, None), text
    text = digest(out)
    acc = [json.loads(x)["accuracy"] for x in (out / "flexlora" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert "- `flexlora seed0` (2 rounds" in text
    assert "  accuracy: " + " ".join(f"{100 * a:.1f}" for a in acc) in text
    assert f"| hlora seed0 | {100 * json.loads((out / 'hlora' / 'seed0' / 'summary.json').read_text())['final_accuracy']:.1f} |" in text
    # the label mix of the sampled clients: one share per round, from the run's own split
    assert "sampled clients, seed0 (from `hlora seed0`" in text
    shares = text.strip().splitlines()[-1].split()
    assert len(shares) == 2 and all(0.0 <= float(s) <= 1.0 for s in shares)
    copy_cells(out, tmp_path / "cells")
    for slug in ("hlora", "flexlora"):
        for name in ("metrics.jsonl", "summary.json", "config.yaml"):
            assert (tmp_path / "cells" / slug / "seed0" / name).read_bytes() == (out / slug / "seed0" / name).read_bytes()


def test_plot_any_runs(tiny_args, tmp_path, capsys):
    from hlora import run
    from tests.test_run import tiny_config

    run(tiny_config(tiny_args, tmp_path / "a"))
    run(tiny_config(tiny_args, tmp_path / "b", strategy="flexlora"))
    code, text = run_cli(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "fig")], capsys)
    assert code in (0, None)
    assert (tmp_path / "fig" / "accuracy.png").exists() and (tmp_path / "fig" / "communication.png").exists()
    code, text = run_cli(["plot", str(tmp_path / "nothing"), "--out", str(tmp_path / "fig")], capsys)
    assert code == 2 and "neither a run directory" in text


def test_spread_labels_keeps_labels_apart_with_least_movement():
    assert spread_labels([1.0, 5.0, 9.0], gap=1.0) == [1.0, 5.0, 9.0]  # already apart: unmoved
    # three labels wanted at one height: spaced by the gap, centred on it, order of input kept
    assert spread_labels([68.4, 68.4, 68.4], gap=1.0) == pytest.approx([67.4, 68.4, 69.4])
    ys = [70.1, 68.4, 71.6, 68.4, 71.1, 30.0]
    out = spread_labels(ys, gap=0.8)
    assert out[5] == 30.0
    ordered = sorted(out)
    assert all(b - a >= 0.8 - 1e-9 for a, b in zip(ordered, ordered[1:]))
    assert sum(out) == pytest.approx(sum(ys))  # a block sits at the mean of its wanted heights


def test_a_grid_left_to_precision_auto_continues(tiny_args, tmp_path, capsys):
    """--precision auto is saved as each cell's choice (fp32 or bf16), which is not another experiment."""
    args = list(tiny_args)
    args[args.index("--precision") + 1] = "auto"
    argv = ["compare", *args, "--strategies", "hlora", "--out", str(tmp_path / "g")]
    code, text = run_cli(argv, capsys)
    assert code in (0, None), text
    saved = (tmp_path / "g" / "hlora" / "seed0" / "config.yaml").read_text()
    assert "precision: auto" not in saved and "precision:" in saved
    code, text = run_cli(argv, capsys)
    assert code in (0, None) and "done, skipped" in text, text
