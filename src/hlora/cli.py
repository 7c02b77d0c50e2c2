"""The ``hlora`` command. Thin: it parses options, builds a RunConfig, and calls the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from hlora.config import ConfigError, RunConfig, load_config
from hlora.data import DataError
from hlora.model import ModelError
from hlora.strategies import StrategyError, names

app = typer.Typer(
    help="Federated fine-tuning of language models with LoRA adapters of different ranks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
USER_ERRORS = (ConfigError, DataError, ModelError, StrategyError)
_D = RunConfig()


@app.callback()
def _group() -> None:
    """Federated fine-tuning of language models with LoRA adapters of different ranks."""


def _default(name: str) -> str:
    value = getattr(_D, name)
    if value is None:
        return {"target_modules": "attention query,value", "out": "runs/<time>-<task>-<strategy>"}.get(
            name, "none"
        )
    return ",".join(value) if isinstance(value, list) else str(value)


def _opt(name: str, help: str, *flags: str) -> Any:
    return typer.Option(None, *flags, help=help, show_default=_default(name))


class RichReporter:
    """A progress bar over the round's local training, and one line per round."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task = None
        self.rounds = 0

    def start(self, cfg: RunConfig, out: Path) -> None:
        self.rounds = cfg.rounds
        ranks = sorted(set(cfg.client_ranks))
        console.print(
            f"[bold]hlora[/] {cfg.strategy} on {cfg.task}: {cfg.clients} clients, {cfg.per_round} per round, "
            f"{cfg.rounds} rounds, ranks {ranks[0]}..{ranks[-1]}, model {cfg.model} -> {out}"
        )

    def round_start(self, round: int, examples: int) -> None:
        if not console.is_terminal:
            return
        self.progress = Progress(
            TextColumn(f"round {round}/{self.rounds}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("examples"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=examples)

    def advance(self, examples: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, examples)

    def round_end(self, row: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        f1 = f" f1 {row['f1']:.3f}" if "f1" in row else ""
        console.print(
            f"round {row['round']:>3}/{self.rounds}  acc {row['accuracy']:.4f}{f1}  "
            f"eval_loss {row['eval_loss']:.4f}  train_loss {row['train_loss']:.4f}  "
            f"up {row['uplink_bytes'] / 1e6:.2f} MB  down {row['downlink_bytes'] / 1e6:.2f} MB  "
            f"{row['seconds']:.1f}s"
        )

    def finish(self, summary: dict[str, Any]) -> None:
        console.print(
            f"done: final accuracy {summary['final_accuracy']:.4f}, best {summary['best_accuracy']:.4f} "
            f"(round {summary['best_round']}), {summary['wall_seconds']:.0f}s"
        )


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="A YAML or JSON config file; options override it."),
    task: Optional[str] = _opt("task", "GLUE task: mrpc or rte (or a name for --train/--dev files)."),
    train: Optional[Path] = _opt("train", "Training file (.tsv, .csv, .jsonl) instead of a GLUE task."),
    dev: Optional[Path] = _opt("dev", "Evaluation file, with the same columns as --train."),
    text_columns: Optional[str] = _opt("text_columns", "Text column(s) of the files: a or a,b (a pair)."),
    label_column: Optional[str] = _opt("label_column", "Label column of the files (strings or integers)."),
    max_length: Optional[int] = _opt("max_length", "Tokens per example (longer ones are truncated)."),
    model: Optional[str] = _opt("model", "Base model: minilm (bundled), or a Hugging Face id or path."),
    target_modules: Optional[str] = _opt("target_modules", "Adapted linear layers, comma-separated names."),
    ranks: Optional[str] = _opt("ranks", "Client LoRA ranks: LOW-HIGH (uniform draw), N, or N,M,... (cyclic)."),
    lora_alpha: Optional[float] = _opt("lora_alpha", "LoRA alpha; a client's scaling is alpha / rank."),
    strategy: Optional[str] = _opt("strategy", f"Aggregation method: {', '.join(names())}."),
    strategy_option: Optional[list[str]] = typer.Option(
        None, "--strategy-option", help="A strategy's option KEY=VALUE, repeatable (e.g. norm_weights=true).",
        show_default="none",
    ),
    clients: Optional[int] = _opt("clients", "Number of clients."),
    per_round: Optional[int] = _opt("per_round", "Clients sampled each round (without replacement)."),
    rounds: Optional[int] = _opt("rounds", "Federated rounds."),
    partition: Optional[str] = _opt("partition", "How training data is split: dirichlet (label skew) or iid."),
    alpha: Optional[float] = _opt("alpha", "Dirichlet concentration of the label split (smaller: more skew)."),
    local_epochs: Optional[int] = _opt("local_epochs", "Local epochs per round."),
    lr: Optional[float] = _opt("lr", "Learning rate (AdamW)."),
    batch_size: Optional[int] = _opt("batch_size", "Local training batch size."),
    eval_batch_size: Optional[int] = _opt("eval_batch_size", "Evaluation batch size."),
    seed: Optional[int] = _opt("seed", "Seed of the split, ranks, client sampling and training."),
    threads: Optional[int] = _opt("threads", "Torch threads (default: torch's choice)."),
    out: Optional[Path] = _opt("out", "Run directory (must not hold a run already)."),
) -> None:
    """Run a federated fine-tuning experiment (defaults: HLoRA on GLUE MRPC, ranks 2..8)."""
    from hlora.engine import run as run_experiment

    overrides = {k: v for k, v in locals().items() if k not in ("config", "run_experiment", "strategy_option")}
    overrides["strategy_options"] = strategy_option or None
    for key in ("train", "dev", "out"):
        if overrides[key] is not None:
            overrides[key] = str(overrides[key])
    cfg = load_config(config, overrides)
    run_experiment(cfg, RichReporter())


def main() -> None:
    """Entry point: user mistakes print one line and exit 2, no traceback."""
    try:
        app()
    except USER_ERRORS as e:
        console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
