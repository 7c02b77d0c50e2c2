"""hlora compare on a tiny grid (2 methods, 2 rounds, tiny model), and hlora plot."""

import csv
import json
import re

import pytest
from PIL import Image

from hlora import __version__
from hlora.compare import cell_labels, parse_methods
from hlora.config import ConfigError
from hlora.data.glue import default_target
from hlora.plots import spread_labels
from hlora.provenance import source_commit
from hlora.report import code_line, code_version
from tests.conftest import tiny_cli_args
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


def test_a_bracketed_value_keeps_its_colons_and_commas(tiny_model, tiny_mrpc, tmp_path):
    ms = parse_methods("hlora:layer_ranks=[query:2-4,value:8]:lr=0.002,fedit:ranks=8")
    assert [m.label for m in ms] == ["hlora:layer_ranks=[query:2-4,value:8]:lr=0.002", "fedit:ranks=8"]
    assert ms[0].overrides == {"layer_ranks": "query:2-4,value:8", "lr": 0.002}
    assert "/" not in ms[0].slug
    from hlora.compare import cell_configs
    from tests.test_run import tiny_config

    shared = tiny_config(tiny_cli_args(tiny_model, tiny_mrpc), tmp_path, threads=1).to_dict()
    for key in ("out", "strategy", "seed", "client_ranks", "client_layer_ranks"):
        shared.pop(key)
    (_, _, cfg), = cell_configs(None, shared, ms[:1], [0], tmp_path / "grid")
    assert cfg.layer_ranks == {"query": "2-4", "value": "8"}
    assert all(set(r.values()) <= {2, 3, 4, 8} for r in cfg.client_layer_ranks)
    for bad, msg in [("hlora:layer_ranks=[query:2", "unclosed '['"), ("hlora:x=]", "unbalanced ']'")]:
        with pytest.raises(ConfigError, match=re.escape(msg)):
            parse_methods(bad)


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
            # the final round's dev predictions, whose accuracy is the run's final accuracy
            saved = json.loads((cell / "dev_predictions.json").read_text())
            assert saved["round"] == 2 and len(saved["predicted"]) == len(saved["gold"]) == 24
            right = sum(p == g for p, g in zip(saved["predicted"], saved["gold"]))
            assert right / 24 == pytest.approx(rows[-1]["accuracy"], abs=1e-6)  # the row's is a float32
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
    assert "s/round" in md and "Δ vs hlora, bootstrap (pts)" in md and "- Δ vs hlora, seeds:" in md
    fe = table[1]
    assert fe["vs"] == "hlora" and fe["seeds_diff_seeds"] == "2" and fe["boot_diff_seeds"] == "2"
    assert fe["resolved"] in ("yes", "no") and float(hl["s_per_round"]) > 0
    # the code each cell ran on, from its summary's provenance (a checkout's commit, or the installed version)
    commit = source_commit()
    dirty = "-dirty" if commit and commit.endswith("-dirty") else ""
    code = f"{commit[:7]}{dirty}" if commit else f"hlora {__version__}"
    assert hl["code"] == fe["code"] == f"{code},{code}"
    assert f"- code (summary.json's provenance), cells: {code} (4)." in md
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
    # --reference: the differences are taken against another method, the same numbers with the sign turned
    code, text = run_cli([*argv, "--report-only", "--reference", "fedit:ranks=4"], capsys)
    assert code in (0, None), text
    flipped = list(csv.DictReader((out / "table.csv").open()))
    assert flipped[0]["vs"] == "fedit:ranks=4" and flipped[1]["vs"] == ""
    assert float(flipped[0]["seeds_diff"]) == pytest.approx(-float(fe["seeds_diff"]))
    assert "Δ vs fedit:ranks=4, bootstrap (pts)" in (out / "table.md").read_text()
    code, text = run_cli([*argv, "--report-only", "--reference", "flexlora"], capsys)
    assert code == 2 and "--reference 'flexlora' is not a method of --strategies (hlora, fedit:ranks=4)" in text
    # --table NAME: a second table of some of the cells beside the grid's own, which stays as it was
    own = {name: (out / name).read_bytes() for name in ("table.md", "table.csv", "accuracy.png")}
    code, text = run_cli([*argv[:i], "fedit:ranks=4", *argv[i + 1:], "--report-only", "--reference",
                          "fedit:ranks=4", "--table", "fedit-only"], capsys)
    said = " ".join(text.split())  # rich wraps the line
    assert code in (0, None) and "fedit-only.md, fedit-only.csv, fedit-only-accuracy.png" in said
    assert [r["method"] for r in csv.DictReader((out / "fedit-only.csv").open())] == ["fedit:ranks=4"]
    assert (out / "fedit-only-accuracy.png").exists() and (out / "fedit-only-communication.png").exists()
    assert {name: (out / name).read_bytes() for name in own} == own
    for bad in ("../up", "x.md", "x.MD", "Table", ""):
        code, text = run_cli([*argv, "--report-only", "--table", bad], capsys)
        assert code == 2 and "--table is a file name without a folder or extension" in text
    # no --target: the task's own (mrpc: 75%)
    code, text = run_cli([*argv[:-2], "--report-only"], capsys)
    assert code in (0, None) and "rounds to 75%" in (out / "table.md").read_text()
    # the same --out with other settings is another experiment: refused at once, nothing touched
    table_before = (out / "table.csv").read_text()
    code, text = run_cli([*argv, "--lr", "0.02"], capsys)
    assert code == 2 and "was run with other settings: lr" in text and "(now 0.02)" in text
    assert (out / "table.csv").read_text() == table_before
    assert (out / "hlora" / "seed0" / "metrics.jsonl").read_text() == before


def test_a_cell_from_before_provenance_reads_as_not_recorded(tmp_path):
    (tmp_path / "summary.json").write_text('{"final_accuracy": 0.7}')
    assert code_version(tmp_path) == "?"
    dirty = {"provenance": {"hlora": "0.1.0", "git_commit": "0123456789ab-dirty"}}
    (tmp_path / "summary.json").write_text(json.dumps(dirty))
    assert code_version(tmp_path) == "0123456-dirty"
    resumed = {"provenance": {"git_commit": "89abcdef00", "resumed_from": ["?", "0123456789"]}}
    (tmp_path / "summary.json").write_text(json.dumps(resumed))
    assert code_version(tmp_path) == "?+0123456+89abcde"
    table = [{"code": "?,0123456"}, {"code": "?"}]
    assert code_line(table) == "- code (summary.json's provenance), cells: not recorded (2), 0123456 (1)."


def test_default_target_is_the_tasks(capsys, monkeypatch):
    assert [default_target(t) for t in ("mrpc", "SST2", "rte", "hf:imdb", None)] == [0.75, 0.80, 0.55, 0.75, 0.75]
    monkeypatch.setenv("COLUMNS", "200")
    code, text = run_cli(["compare", "--help"], capsys)  # the help names them, from the same table
    assert code == 0 and "Default: the task's (MRPC 0.75, RTE 0.55, SST-2 0.80; 0.75 for other tasks)" in text


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


# --jobs, resuming a parallel grid, and the claim that keeps two processes off one cell. The grid: 2 methods
# x 2 seeds, 3 rounds, every cell at 1 thread (float sums, hence bits, depend on the thread count).
GRID = ["--strategies", "hlora,flexlora", "--seeds", "0,1", "--target", "0.5"]
CELLS = [f"{m}/seed{s}" for m in ("hlora", "flexlora") for s in (0, 1)]


def _grid_args(tiny_model, tiny_mrpc):
    from tests.conftest import tiny_cli_args

    args = tiny_cli_args(tiny_model, tiny_mrpc)
    args[args.index("--rounds") + 1] = "3"
    return [*args, *GRID]


@pytest.fixture(scope="module")
def reference_grid(tiny_model, tiny_mrpc, tmp_path_factory):
    """The grid run one cell after the other in this process (``--jobs 1 --threads 1``)."""
    out = tmp_path_factory.mktemp("reference") / "grid"
    code = _cli([*_grid_args(tiny_model, tiny_mrpc), "--jobs", "1", "--threads", "1", "--out", str(out)])
    assert code in (0, None)
    return out


def _cli(argv):
    """``hlora compare ARGV`` in this process, without pytest's capture (for a module fixture)."""
    import sys

    from hlora import cli

    old = sys.argv
    sys.argv = ["hlora", "compare", *argv]
    try:
        with pytest.raises(SystemExit) as exc:
            cli.main()
    finally:
        sys.argv = old
    return exc.value.code


def _cell_files(cell):
    """Everything a finished cell holds that does not measure time, by file: equal means bit for bit."""
    import yaml

    config = yaml.safe_load((cell / "config.yaml").read_text())
    config.pop("out")
    summary = json.loads((cell / "summary.json").read_text())
    summary.pop("wall_seconds")
    rows = [{k: v for k, v in json.loads(x).items() if not k.startswith("seconds")}
            for x in (cell / "metrics.jsonl").read_text().splitlines()]
    files = {"config": config, "summary": summary, "metrics": rows,
             "predictions": (cell / "dev_predictions.json").read_bytes()}
    files.update({f.name: f.read_bytes() for f in sorted((cell / "adapter").iterdir())})
    # PEFT writes target_modules from a set, in an order that varies from process to process
    adapter_config = json.loads(files.pop("adapter_config.json"))
    files["adapter_config.json"] = {**adapter_config, "target_modules": sorted(adapter_config["target_modules"])}
    return files


def _same_cells(out, reference):
    for cell in CELLS:
        assert (out / cell / "summary.json").exists(), cell
        assert _cell_files(out / cell) == _cell_files(reference / cell), cell
    assert not list(out.glob("*/*.lock")), "a lock was left behind"


def test_jobs_2_gives_the_cells_of_jobs_1_bit_for_bit(tiny_model, tiny_mrpc, reference_grid, tmp_path, capfd):
    out = tmp_path / "grid"
    code, text = run_cli(["compare", *_grid_args(tiny_model, tiny_mrpc), "--jobs", "2", "--out", str(out)], capfd)
    assert code in (0, None), text
    _same_cells(out, reference_grid)
    assert (out / "table.csv").read_text() .split("\n")[0] == (reference_grid / "table.csv").read_text().split("\n")[0]
    # each cell in a process of its own at 1 thread: one start line each, one round line per round
    starts = [line for line in text.splitlines() if "] started (pid" in line]
    assert len(starts) == 4 and all("1 thread(s)" in line for line in starts)
    assert len({line.split("pid ")[1].split(",")[0] for line in starts}) == 4
    assert text.count("round 3/3") == 4 and text.count(": finished, final accuracy") == 4
    code, text = run_cli(["compare", *_grid_args(tiny_model, tiny_mrpc), "--jobs", "2", "--out", str(out)], capfd)
    assert code in (0, None) and text.count("done, skipped") == 4 and "started" not in text


def test_an_interrupted_parallel_grid_resumes(tiny_model, tiny_mrpc, reference_grid, tmp_path, capfd):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "grid"
    argv = ["compare", *_grid_args(tiny_model, tiny_mrpc), "--jobs", "2", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "hlora.cli", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # a cell has checkpointed a round: kill the grid and its cells' processes
        if any((out / c / "checkpoint.pt").exists() for c in CELLS):
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not all((out / c / "summary.json").exists() for c in CELLS), "the grid was not killed mid-way"
    assert list(out.glob("*/*.lock")), "no cell was running"  # its killed holder could not remove it
    code, text = run_cli(argv, capfd)
    assert code in (0, None), text
    assert "resuming at round" in text
    _same_cells(out, reference_grid)


def _hold(cell):
    """Another process that claims ``cell`` and holds it until killed."""
    import subprocess
    import sys

    code = ("import sys, time; from pathlib import Path; from hlora.compare import claim; "
            "c = claim(Path(sys.argv[1])); print('held' if c else 'refused', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(cell)], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def test_a_cell_is_claimed_by_one_process_at_a_time(tmp_path):
    from hlora.compare import claim, holder, lock_path

    cell = tmp_path / "hlora" / "seed0"
    first, said = _hold(cell)
    try:
        assert said == "held" and holder(cell) == first.pid
        second, said2 = _hold(cell)
        second.kill()
        assert said2 == "refused"
        assert claim(cell) is None  # nor this process
    finally:
        first.kill()  # kill -9: its lock file stays, but the lock dies with it
        first.wait()
    assert lock_path(cell).exists()
    mine = claim(cell)
    assert mine is not None and holder(cell) == __import__("os").getpid()
    other, said = _hold(cell)
    other.kill()
    assert said == "refused"
    mine.release()
    assert not lock_path(cell).exists()
    again = claim(cell)
    assert again is not None
    again.release()


def test_the_grid_waits_for_a_cell_another_process_holds_then_takes_it(
    tiny_model, tiny_mrpc, reference_grid, tmp_path
):
    """A cell held by another process is left to it; when that process dies (here: without finishing it),
    the grid takes the cell over and runs it."""
    from hlora.compare import cell_configs, parse_methods, run_grid
    from tests.test_run import tiny_config

    out = tmp_path / "grid"
    other, said = _hold(out / "flexlora" / "seed0")
    assert said == "held"
    shared = tiny_config(_grid_args(tiny_model, tiny_mrpc)[: -len(GRID)], out, threads=1).to_dict()
    for key in ("out", "strategy", "seed", "client_ranks"):
        shared.pop(key)
    cells = cell_configs(None, shared, parse_methods("hlora,flexlora"), [0, 1], out)
    said_lines = []

    def say(msg):
        said_lines.append(msg)
        if "running in another process" in msg:
            assert not (out / "flexlora" / "seed0" / "config.yaml").exists()
            other.kill()  # it dies without running the cell

    try:
        run_grid(cells, lambda *a: None, say, jobs=1, poll=0.1)
    finally:
        other.kill()
        other.wait()
    assert said_lines[0] == f"cell 2/4 flexlora seed 0: running in another process (pid {other.pid}); waiting for it"
    _same_cells(out, reference_grid)


def test_two_compare_processes_into_one_out_never_train_the_same_cell(
    tiny_model, tiny_mrpc, reference_grid, tmp_path
):
    import subprocess
    import sys

    out = tmp_path / "grid"
    argv = [sys.executable, "-m", "hlora.cli", "compare", *_grid_args(tiny_model, tiny_mrpc), "--jobs", "1",
            "--threads", "1", "--out", str(out)]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    texts = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], texts
    # a process prints "cell i/4: METHOD, seed S" when it has claimed a cell and starts it
    trained = [[line.split(": ")[1].split(", about")[0] for line in t.splitlines()
                if line.startswith("cell ") and "/4: " in line] for t in texts]
    assert sorted(trained[0] + trained[1]) == sorted(f"{m}, seed {s}" for m in ("hlora", "flexlora") for s in (0, 1))
    _same_cells(out, reference_grid)
    for t in texts:  # both write the whole table: each waited for the cells the other ran
        assert "(2 methods)" in t


def test_bad_jobs_and_a_cell_failing_in_its_process_are_one_line_and_exit_2(tiny_args, tmp_path, capfd):
    argv = ["compare", *tiny_args, "--strategies", "hlora,flexlora", "--out", str(tmp_path / "g")]
    code, text = run_cli([*argv, "--jobs", "0"], capfd)
    assert code == 2 and "--jobs must be at least 1, got 0" in text and not (tmp_path / "g").exists()
    # 60 clients of 48 examples: refused when the cell loads its data, in its own process
    i = argv.index("--clients")
    argv[i + 1] = "60"
    code, text = run_cli([*argv, "--jobs", "2"], capfd)
    assert code == 2 and "Traceback" not in text
    assert "error: cell 1/2 hlora seed 0: --clients 60 exceeds the 48 training examples" in " ".join(text.split()) \
        or "error: cell 2/2 flexlora seed 0: --clients 60 exceeds the 48 training examples" in " ".join(text.split())


def test_a_grid_left_to_precision_auto_chooses_once_and_continues(tiny_args, tmp_path, capsys, monkeypatch):
    """--precision auto is chosen once for the grid (one timing probe, before any cell) and saved as every
    cell's precision, which is not another experiment; a method added later takes the grid's choice without a
    new probe, and a cell that holds a config keeps its own."""
    import yaml

    from hlora import precision
    from hlora.engine import simulation

    probes = []
    real = precision.resolve_precision

    def counted(mode, step, *args, **kwargs):  # the real choice, counted when it times anything
        if mode == "auto":
            probes.append(mode)
        return real(mode, step, *args, **kwargs)

    monkeypatch.setattr(simulation, "resolve_precision", counted)
    args = list(tiny_args)
    args[args.index("--precision") + 1] = "auto"
    out = tmp_path / "g"
    argv = ["compare", *args, "--strategies", "hlora,fedit:ranks=4", "--out", str(out)]
    code, text = run_cli(argv, capsys)
    assert code in (0, None), text
    chosen = [yaml.safe_load((out / m / "seed0" / "config.yaml").read_text())["precision"]
              for m in ("hlora", "fedit__ranks-4")]
    assert chosen[0] in ("fp32", "bf16") and chosen[0] == chosen[1] and probes == ["auto"]
    assert f"precision auto: {chosen[0]} for the grid's 2 new cell(s) (timed once" in " ".join(text.split())
    code, text = run_cli(argv, capsys)
    assert code in (0, None) and "done, skipped" in text and probes == ["auto"], text
    argv = ["compare", *args, "--strategies", "hlora,flexlora", "--out", str(out)]
    code, text = run_cli(argv, capsys)
    assert code in (0, None) and probes == ["auto"], text
    assert yaml.safe_load((out / "flexlora" / "seed0" / "config.yaml").read_text())["precision"] == chosen[0]
    assert "for the grid's 1 new cell(s) (as the grid's earlier cells)" in " ".join(text.split())
