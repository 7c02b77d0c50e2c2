"""Bad input: one clear line naming the problem, exit status 2, no traceback."""

import sys

import pytest

from hlora import cli


def run_cli(argv, capsys):
    old = sys.argv
    sys.argv = ["hlora", *argv]
    try:
        with pytest.raises(SystemExit) as exc:
            cli.main()
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return exc.value.code, captured.out + captured.err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--task", "sst9"], "unknown task 'sst9'"),
        (["--strategy", "fedmagic"], "unknown strategy 'fedmagic'"),
        (["--strategy", "fedit", "--clients", "5", "--per-round", "2"], "defined for equal ranks only"),
        (["--model", "/no/such/model"], "model path '/no/such/model' does not exist"),
        (["--ranks", "0"], "a LoRA rank must be at least 1"),
        (["--per-round", "101"], "--per-round must be between 1 and --clients (100)"),
        (["--alpha", "0"], "--alpha (the Dirichlet concentration) must be > 0"),
        (["--alpha", "-2"], "--alpha (the Dirichlet concentration) must be > 0"),
        (["--train", "/no/such.tsv", "--dev", "/no/such.tsv", "--text-columns", "a", "--label-column", "y"],
         "data file not found: /no/such.tsv"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    code, text = run_cli(["run", *argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert message in " ".join(text.split())
    assert "Traceback" not in text
    assert len(text.strip().splitlines()) == 1


def test_malformed_row_names_the_line(capsys, tmp_path, tiny_model):
    bad = tmp_path / "bad.tsv"
    bad.write_text("s\ty\nfine\t1\nno label here\n")
    code, text = run_cli(["run", "--train", str(bad), "--dev", str(bad), "--text-columns", "s",
                          "--label-column", "y", "--model", tiny_model, "--clients", "1",
                          "--per-round", "1", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "bad.tsv line 3: expected 2 fields, found 1" in " ".join(text.split())


def test_rank_above_layer_width(capsys, tmp_path, tiny_args):
    code, text = run_cli(["run", *tiny_args, "--ranks", "64", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "rank 64 is above the width 32" in " ".join(text.split())
    assert not (tmp_path / "o").exists()  # nothing written for a refused run


def test_help_documents_every_option_with_its_default(capsys):
    code, text = run_cli(["run", "--help"], capsys)
    assert code == 0
    flat = " ".join(text.split())
    for flag in ["--clients", "--per-round", "--rounds", "--local-epochs", "--lr", "--batch-size", "--seed",
                 "--partition", "--alpha", "--ranks", "--strategy", "--model", "--target-modules", "--train",
                 "--dev", "--text-columns", "--label-column", "--out"]:
        assert flag in flat
    assert "[default: (100)]" in flat and "[default: (2-8)]" in flat and "[default: (dirichlet)]" in flat


def test_help_groups_every_run_option_in_a_panel(capsys):
    import inspect

    options = [name for name in inspect.signature(cli.run).parameters if name != "config"]
    unplaced = [name for name in options if name not in cli._PANEL]
    assert not unplaced, f"run options with no help panel in cli.PANELS: {unplaced}"
    for command in ("run", "compare"):
        code, text = run_cli([command, "--help"], capsys)
        assert code == 0
        titles = [line.split("─ ", 1)[1].split(" ─")[0] for line in text.splitlines() if line.startswith("╭─ ")]
        assert [t for t in titles if t in cli.PANELS] == list(cli.PANELS), titles
    code, text = run_cli(["run", "--help"], capsys)
    panel = text[text.index("╭─ Server "):]
    assert "--server-lr" in panel[:panel.index("╰")]
