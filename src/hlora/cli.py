"""The ``hlora`` command. Thin: it parses options, builds a RunConfig, and calls the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from hlora.config import ConfigError, RunConfig, load_config
from hlora.data import DataError
from hlora.data.glue import DEFAULT_TARGET, GLUE
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
        return {"target_modules": "attention query,value", "out": "runs/<time>-<task>-<strategy>",
                "server_opt": "avgm for hlora/flexlora on classification, avg otherwise",
                "robust_m": "K - f", "robust_trim": "f / K", "robust_clip": "--robust-clip-ratio x the round's median",
                "attack_lambda": "1 for signflip and noise, 5 for scale",
                "dp_clip": "off", "dp_noise": "from --dp-epsilon-target", "dp_epsilon_target": "none",
                "dp_delta": "1 / clients^1.1", "dp_adaptive_clip": "off",
                "server_lr": "2 with the default avgm, else 1",
                "head_lr": "0.1 for an sgd head, --lr for adamw",
                "log_group": "MLflow: hlora, W&B: none; compare: the grid's name",
                "mlflow_uri": "a file store in OUT/mlruns",
                "rank_policy": "uniform for LOW-HIGH, list for N,M,..."}.get(
            name, "none"
        )
    if value == []:
        return "none"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


# `hlora run --help` groups its options in these panels (compare shows the same ones); every run option names
# its panel here, and tests/test_cli.py fails when one does not.
PANELS: dict[str, tuple[str, ...]] = {
    "Data": ("task", "train", "dev", "text_columns", "label_column", "max_length", "train_subset", "prompt_field",
             "input_field", "response_field", "category_field", "partition", "alpha", "classes_per_client",
             "shards_per_client", "size_exponent"),
    "Model": ("model", "target_modules", "ranks", "rank_policy", "rank_file", "layer_ranks", "lora_alpha", "dtype",
              "dropout", "attention", "gradient_checkpointing", "precision"),
    "Federation": ("strategy", "strategy_option", "clients", "per_round", "rounds", "client_weights", "min_clients",
                   "max_norm_ratio"),
    "Local training": ("preset", "local_epochs", "local_steps", "lr", "lr_schedule", "batch_size", "client_opt",
                       "adam_eps", "head_opt", "head_lr", "logit_adjust", "prox_mu"),
    "Server": ("server_opt", "server_lr", "server_momentum", "server_betas", "server_tau", "server_rank"),
    "Privacy and robustness": ("robust", "robust_f", "robust_m", "robust_trim", "robust_clip", "robust_clip_ratio",
                               "robust_dense_mb", "attack", "attackers", "attack_lambda", "dp_clip", "dp_noise",
                               "dp_epsilon_target", "dp_delta", "dp_adaptive_clip", "dp_dense_mb"),
    "Evaluation and outputs": ("gen_samples", "max_new_tokens", "eval_every", "eval_batch_size", "personal_holdout",
                               "personal_eval", "seed", "threads", "out", "log", "log_group", "mlflow_uri", "resume"),
}
_PANEL = {name: panel for panel, names in PANELS.items() for name in names}


def _opt(name: str, help: str, *flags: str) -> Any:
    return typer.Option(None, *flags, help=help, show_default=_default(name), rich_help_panel=_PANEL.get(name))


class RichReporter:
    """A progress bar over the round's local training, and one line per round."""

    def __init__(self, prefix: str = "") -> None:
        self.progress: Progress | None = None
        self.task = None
        self.rounds = 0
        self.prefix = prefix

    def start(self, cfg: RunConfig, out: Path, first_round: int) -> None:
        self.rounds = cfg.rounds
        ranks = sorted(set(cfg.client_ranks))
        if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
            shown = f"{ranks[0]}..{ranks[-1]}"
        else:
            shown = ",".join(map(str, ranks))
        if cfg.layer_ranks:
            shown += " (" + ", ".join(f"{p} {spec}" for p, spec in cfg.layer_ranks.items()) + ")"
        again = f", resuming at round {first_round}" if first_round > 1 else ""
        console.print(
            f"{self.prefix}[bold]hlora[/] {cfg.strategy} on {cfg.task}: {cfg.clients} clients, "
            f"{cfg.per_round} per round, {cfg.rounds} rounds, ranks {shown}, "
            f"model {cfg.model}, precision {cfg.precision}{again} -> {out}",
            highlight=False,
        )

    def round_start(self, round: int, examples: int) -> None:
        if not console.is_terminal:
            return
        self.progress = Progress(
            TextColumn(f"{self.prefix}round {round}/{self.rounds}"),
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
        for r in row.get("rejected", []):
            console.print(f"{self.prefix}  rejected client {r['client']}: {r['reason']}", highlight=False)
        if row.get("skipped"):
            console.print(f"{self.prefix}  round skipped: too few valid updates (--min-clients)")
        if "accuracy" in row:
            score = f"acc {row['accuracy']:.4f}{f1}  eval_loss {row['eval_loss']:.4f}"
        elif "perplexity" in row:  # a language model
            score = f"ppl {row['perplexity']:.2f}" + (f" rouge_l {row['rouge_l']:.3f}" if "rouge_l" in row else "")
            score += f"  eval_loss {row['eval_loss']:.4f}"
        else:  # not evaluated this round (--eval-every)
            score = "(not evaluated)"
        if "personal_accuracy" in row:  # a personalised strategy: each client's own model on its held-out share
            score += f"  personal {row['personal_accuracy']:.4f}"
        console.print(
            f"{self.prefix}round {row['round']:>3}/{self.rounds}  {score}  "
            f"train_loss {float('nan') if row['train_loss'] is None else row['train_loss']:.4f}  "
            f"up {row['uplink_bytes'] / 1e6:.2f} MB  down {row['downlink_bytes'] / 1e6:.2f} MB  "
            f"{row['seconds']:.1f}s"
        )

    def finish(self, summary: dict[str, Any]) -> None:
        key = "accuracy" if "final_accuracy" in summary else "eval_loss"
        console.print(
            f"done: final {key.replace('_', ' ')} {summary[f'final_{key}']:.4f}, best {summary[f'best_{key}']:.4f} "
            f"(round {summary['best_round']}), {summary['wall_seconds']:.0f}s"
        )


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="A YAML or JSON config file; options override it."),
    task: Optional[str] = _opt(
        "task", "GLUE task: mrpc, rte or sst2; instruct (decoder LM on instruction JSONL, with --train/--dev); "
        "hf:NAME[:CONFIG] for a Hugging Face dataset; or a name for --train/--dev."
    ),
    train: Optional[Path] = _opt("train", "Training file (.tsv, .csv, .jsonl) instead of a GLUE task."),
    dev: Optional[Path] = _opt("dev", "Evaluation file, with the same columns as --train."),
    text_columns: Optional[str] = _opt("text_columns", "Text column(s) of the files: a or a,b (a pair)."),
    label_column: Optional[str] = _opt("label_column", "Label column of the files (strings or integers)."),
    max_length: Optional[int] = _opt("max_length", "Tokens per example (longer ones are truncated)."),
    train_subset: Optional[int] = _opt(
        "train_subset", "Keep N training examples: a seeded draw, the same for every --seed (e.g. 6000 of sst2)."
    ),
    prompt_field: Optional[str] = _opt("prompt_field", "Instruction field of --task instruct data (default: instruction)."),
    input_field: Optional[str] = _opt("input_field", "Optional input field (default: input or context)."),
    response_field: Optional[str] = _opt("response_field", "Response field (default: output or response)."),
    category_field: Optional[str] = _opt(
        "category_field", "Category field: the Dirichlet split is over it (default: category, if present)."
    ),
    gen_samples: Optional[int] = _opt("gen_samples", "Dev examples generated greedily each round for ROUGE-L."),
    max_new_tokens: Optional[int] = _opt("max_new_tokens", "Tokens generated per ROUGE-L example."),
    model: Optional[str] = _opt("model", "Base model: minilm (bundled), or a Hugging Face id or path."),
    target_modules: Optional[str] = _opt("target_modules", "Adapted linear layers, comma-separated names."),
    ranks: Optional[str] = _opt("ranks", "Client LoRA ranks: LOW-HIGH (uniform draw), N, or N,M,... (cyclic)."),
    rank_policy: Optional[str] = _opt(
        "rank_policy", "How clients get ranks: uniform, list, data (grows with the client's examples), file."
    ),
    rank_file: Optional[Path] = _opt("rank_file", "CSV of client,rank rows (--rank-policy file)."),
    layer_ranks: Optional[str] = _opt(
        "layer_ranks", "Per-layer ranks, PATTERN:SPEC,... (e.g. query:2-4,value:8); other layers keep --ranks."
    ),
    lora_alpha: Optional[float] = _opt("lora_alpha", "LoRA alpha; a client's scaling is alpha / rank."),
    dtype: Optional[str] = _opt(
        "dtype", "Base model weights, --task instruct only: float32 or bfloat16 (adapters stay float32)."
    ),
    dropout: Optional[float] = _opt(
        "dropout",
        "The base model's dropout probability (hidden and attention) in local training; --preset paper: the "
        "checkpoint's own.",
    ),
    attention: Optional[str] = _opt(
        "attention", "Attention implementation: auto (eager on CPU, SDPA on a GPU), sdpa or eager."
    ),
    gradient_checkpointing: Optional[bool] = typer.Option(
        None, "--gradient-checkpointing",
        help="Recompute activations in the backward pass (less memory, more compute); --task instruct only.",
        show_default="off", rich_help_panel=_PANEL["gradient_checkpointing"],
    ),
    strategy: Optional[str] = _opt("strategy", f"Aggregation method: {', '.join(names())}."),
    strategy_option: Optional[list[str]] = typer.Option(
        None, "--strategy-option", help="A strategy's option KEY=VALUE, repeatable (e.g. norm_weights=true).",
        show_default="none", rich_help_panel=_PANEL["strategy_option"],
    ),
    clients: Optional[int] = _opt("clients", "Number of clients."),
    per_round: Optional[int] = _opt("per_round", "Clients sampled each round (without replacement)."),
    rounds: Optional[int] = _opt("rounds", "Federated rounds."),
    partition: Optional[str] = _opt(
        "partition", "How training data is split: dirichlet (label skew; category skew for instruct), iid, "
        "pathological (--classes-per-client labels each), shard (--shards-per-client label-sorted shards each), "
        "size (power-law sizes, labels IID), natural:COLUMN (one client per value of a column of --train)."
    ),
    alpha: Optional[float] = _opt("alpha", "Dirichlet concentration of the label split (smaller: more skew)."),
    classes_per_client: Optional[int] = _opt("classes_per_client", "Labels each client holds (--partition pathological)."),
    shards_per_client: Optional[int] = _opt("shards_per_client", "Shards each client gets (--partition shard)."),
    size_exponent: Optional[float] = _opt(
        "size_exponent", "Power-law exponent of the client sizes (--partition size; smaller: more skew)."
    ),
    min_clients: Optional[int] = _opt("min_clients", "Valid updates a round needs; below it the round is skipped."),
    max_norm_ratio: Optional[float] = _opt(
        "max_norm_ratio", "Reject an update whose norm exceeds this many times the round's median (0: off)."
    ),
    robust: Optional[str] = _opt(
        "robust", "Robust aggregation: none, krum, multikrum, median, trimmed (reject the clients farthest from "
        "the coordinate-wise statistic), normclip (scale changes above a bound)."
    ),
    robust_f: Optional[int] = _opt("robust_f", "The assumed number of Byzantine clients a round (--robust)."),
    robust_m: Optional[int] = _opt("robust_m", "Clients multikrum keeps."),
    robust_trim: Optional[float] = _opt("robust_trim", "The trimmed mean's beta: the fraction trimmed a side."),
    robust_clip: Optional[float] = _opt("robust_clip", "normclip's fixed bound on a client's change norm."),
    robust_clip_ratio: Optional[float] = _opt(
        "robust_clip_ratio", "normclip's bound as this many times the round's median change norm."
    ),
    robust_dense_mb: Optional[float] = _opt(
        "robust_dense_mb", "Memory (MB) median and trimmed may take for one module's dense changes."
    ),
    attack: Optional[str] = _opt(
        "attack", "Simulated attack: none, signflip, scale, noise (factors' change) or labelflip (data)."
    ),
    attackers: Optional[float] = _opt("attackers", "Fraction of the clients that attack (a seeded subset)."),
    attack_lambda: Optional[float] = _opt("attack_lambda", "The attack's factor L (signflip: -L, scale: x L, noise)."),
    dp_clip: Optional[float] = _opt(
        "dp_clip", "Client-level DP (DP-FedAvg; hlora, flexlora on s B A; fedit, ffa, rolora on their factors): "
        "clip each client's change to this L2 norm C (0: off)."
    ),
    dp_noise: Optional[float] = _opt("dp_noise", "DP noise multiplier z: N(0, (z C / per-round)^2) on the average."),
    dp_epsilon_target: Optional[float] = _opt(
        "dp_epsilon_target", "DP: choose z so that epsilon after --rounds is at most this (instead of --dp-noise)."
    ),
    dp_delta: Optional[float] = _opt("dp_delta", "DP delta of the reported epsilon."),
    dp_adaptive_clip: Optional[float] = _opt(
        "dp_adaptive_clip", "DP: let C follow this quantile of the clients' change norms, from --dp-clip (Andrew "
        "et al. 2021; a noisy count takes part of z)."
    ),
    dp_dense_mb: Optional[float] = _opt(
        "dp_dense_mb", "Memory (MB) DP may take for one module's dense noisy change and its SVD."
    ),
    preset: Optional[str] = _opt(
        "preset", "A named set of training defaults under the file and options: paper (the papers' training: "
        "2 local epochs of plain cross-entropy with AdamW at batch 16, n_k/n weights, the strategy's own rule)."
    ),
    local_epochs: Optional[int] = _opt("local_epochs", "Local epochs per round (when --local-steps is not set)."),
    local_steps: Optional[int] = _opt(
        "local_steps", "Optimizer steps per client per round, cycling its data (overrides --local-epochs)."
    ),
    lr: Optional[float] = _opt("lr", "Client learning rate (AdamW)."),
    lr_schedule: Optional[str] = _opt(
        "lr_schedule", "Client lr across rounds: constant, or cosine (from --lr down to lr/50 at the last round)."
    ),
    batch_size: Optional[int] = _opt("batch_size", "Local training batch size."),
    client_opt: Optional[str] = _opt(
        "client_opt", "Optimizer of the adapters: adamw, or sgd (steps proportional to the gradient)."
    ),
    adam_eps: Optional[float] = _opt(
        "adam_eps", "AdamW's epsilon on the clients: gradients well below it take proportionally small steps."
    ),
    head_opt: Optional[str] = _opt(
        "head_opt", "Optimizer of the classification head: adamw; sgd (steps proportional to the gradient); "
        "or frozen (kept at its seeded initialisation, FedBABU)."
    ),
    head_lr: Optional[float] = _opt("head_lr", "Learning rate of the head."),
    logit_adjust: Optional[float] = _opt(
        "logit_adjust", "Label-skew correction tau: clients train on CE(logits + tau log(pi_client / pi_all)); "
        "evaluation and exports use the raw logits (0: off; classification only)."
    ),
    prox_mu: Optional[float] = _opt(
        "prox_mu", "FedProx: mu/2 ||s B A - s B0 A0||^2 (+ the head's change) added to the client loss (0: off)."
    ),
    server_opt: Optional[str] = _opt(
        "server_opt", "Server optimizer: avg (the strategy's rule), avgm (momentum; factored for hlora/flexlora), "
        "adam, yogi (factor-space strategies)."
    ),
    server_lr: Optional[float] = _opt("server_lr", "Server learning rate eta (avgm, adam, yogi)."),
    server_momentum: Optional[float] = _opt("server_momentum", "Server momentum beta of avgm, in [0, 1)."),
    server_betas: Optional[str] = _opt("server_betas", "Adam/Yogi betas b1,b2."),
    server_tau: Optional[float] = _opt("server_tau", "Adam/Yogi epsilon tau."),
    server_rank: Optional[int] = _opt(
        "server_rank", "Rank cap of the factored global update and momentum (avgm on hlora/flexlora)."
    ),
    client_weights: Optional[str] = _opt(
        "client_weights", "Aggregation weight of a client: examples (n_k/n, the papers') or uniform (1/K)."
    ),
    precision: Optional[str] = _opt(
        "precision", "Base model compute: fp32, bf16 (autocast; adapters, optimizer and loss stay float32), "
        "or auto (bf16 where supported and faster)."
    ),
    eval_every: Optional[int] = _opt("eval_every", "Evaluate every K rounds (and always after the last)."),
    personal_holdout: Optional[float] = _opt(
        "personal_holdout", "Share of each client's examples held out to score its own model (fedsa, or "
        "--personal-eval)."
    ),
    personal_eval: Optional[bool] = typer.Option(
        None, "--personal-eval",
        help="Score any strategy as fedsa is scored: hold out --personal-holdout of each client's examples and "
        "score the model on each client's share (a global strategy's global model), beside the dev set.",
        show_default="off", rich_help_panel=_PANEL["personal_eval"],
    ),
    eval_batch_size: Optional[int] = _opt("eval_batch_size", "Evaluation batch size."),
    seed: Optional[int] = _opt("seed", "Seed of the split, ranks, client sampling and training."),
    threads: Optional[int] = _opt("threads", "Torch threads (default: torch's choice)."),
    out: Optional[Path] = _opt("out", "Run directory (must not hold a run already)."),
    log: Optional[str] = _opt(
        "log", "Experiment tracking, comma-separated: tensorboard (OUT/tb), mlflow, wandb (offline unless "
        "logged in)."
    ),
    log_group: Optional[str] = _opt("log_group", "MLflow experiment and W&B group of the run."),
    mlflow_uri: Optional[str] = _opt("mlflow_uri", "MLflow tracking URI (a server, or sqlite:///...)."),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Continue the run in this directory from its last checkpoint (no other options).",
        show_default="none", rich_help_panel=_PANEL["resume"],
    ),
) -> None:
    """Run a federated fine-tuning experiment (defaults: HLoRA on GLUE MRPC, ranks 2..8).

    CONFIG (optional): a YAML or JSON file of options (same names); options given here override it.
    """
    from hlora.engine import resume as resume_run
    from hlora.engine import run as run_experiment

    overrides = _overrides(locals())
    if resume is not None:
        given = sorted(k for k, v in overrides.items() if v is not None)
        if config is not None or given:
            raise ConfigError(f"--resume takes no other options (got {', '.join(given) or 'a config file'})")
        resume_run(resume, RichReporter())
        return
    run_experiment(load_config(config, overrides), RichReporter())


def _by_panel(command: Any) -> None:
    """Order a command's options by panel (typer draws the panels in the order of their first option)."""
    import inspect

    order = {panel: i for i, panel in enumerate(PANELS)}
    sig = inspect.signature(command)
    params = sorted(sig.parameters.values(), key=lambda p: order.get(_PANEL.get(p.name, ""), -1))
    command.__signature__ = sig.replace(parameters=params)


_by_panel(run)


def _overrides(values: dict[str, Any]) -> dict[str, Any]:
    """The run options of a command's arguments, as RunConfig field values (None: not given)."""
    skip = ("config", "resume", "run_experiment", "resume_run", "strategy_option", "strategies", "seeds", "target",
            "report_only", "jobs")
    out = {k: v for k, v in values.items() if k not in skip}
    if "strategy_option" in values:
        out["strategy_options"] = values["strategy_option"] or None
    for key in ("train", "dev", "out"):
        if out.get(key) is not None:
            out[key] = str(out[key])
    return out


def compare(
    strategies: str = typer.Option(
        ..., help="Methods, comma-separated; METHOD:key=value overrides a run option or strategy option."
    ),
    seeds: str = typer.Option("0", help="Seeds, comma-separated: each method runs once per seed."),
    target: Optional[float] = typer.Option(
        None, help="Accuracy whose first round the table reports. Default: the task's ("
        f"{', '.join(f'{g.folder} {g.target:.2f}' for g in GLUE.values())}; {DEFAULT_TARGET:.2f} for other tasks)."
    ),
    report_only: bool = typer.Option(
        False, "--report-only", help="Run nothing: write the tables and figures of the cells finished so far."
    ),
    jobs: int = typer.Option(
        1, help="Cells run at once, each in its own process (at 1 thread unless --threads is given)."
    ),
    reference: str = typer.Option(
        "hlora", help="The method of --strategies every other is compared with (per seed and by the bootstrap)."
    ),
    table: str = typer.Option(
        "table", help="Name of the table files in --out: NAME.md and NAME.csv (figures: NAME-accuracy.png, "
        "NAME-communication.png). Another name writes a second table beside the grid's own, e.g. "
        "--report-only on a subset of --strategies with another --reference."
    ),
    **run_options: Any,
) -> None:
    """Run a grid of methods x seeds on the same split and client sample; write table.md/.csv and figures.

    CONFIG (optional): a YAML or JSON file of the settings all cells share; options given here override it.
    Classification tasks only (the table is accuracy).
    """
    from hlora.compare import compare as run_compare
    from hlora.compare import parse_methods

    config = run_options.pop("config", None)
    out = run_options.pop("out")
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes integers, comma-separated; got {seeds!r}") from None
    if not seed_list:
        raise ConfigError("--seeds names no seed")
    if target is not None and not 0 < target <= 1:
        raise ConfigError(f"--target is an accuracy between 0 and 1, got {target}")
    shared = _overrides(run_options)

    def reporter_for(i: int, n: int, method, seed: int, eta: float | None) -> RichReporter:
        left = f", about {eta / 60:.0f} min left" if eta is not None else ""
        console.print(f"[bold]cell {i}/{n}[/]: {method.label}, seed {seed}{left}", highlight=False)
        return RichReporter(prefix=f"[{i}/{n} {method.label} s{seed}] ")

    rows = run_compare(config, shared, parse_methods(strategies), seed_list, Path(out), target, reporter_for,
                        say=lambda msg: console.print(msg, highlight=False), run_cells=not report_only,
                        jobs=jobs, reference=reference, table_name=table)
    from hlora.report import figure_prefix

    figures = figure_prefix(table)
    console.print(f"wrote {out}/{table}.md, {table}.csv, {figures}accuracy.png, {figures}communication.png "
                  f"({len(rows)} methods)")


def _compare_signature() -> None:
    """compare takes every run option (but --strategy, --seed and --resume, which the grid sets)."""
    import inspect
    import typing

    hints = {**typing.get_type_hints(run), **typing.get_type_hints(compare)}
    own = [p for name, p in inspect.signature(compare).parameters.items() if name != "run_options"]
    shared = [
        p for name, p in inspect.signature(run).parameters.items()
        if name not in ("strategy", "seed", "resume", "strategy_option")
    ]
    grid_out = typer.Option(..., help="The grid's directory (one run per method and seed); a grid there resumes.")
    shared = [p.replace(default=grid_out) if p.name == "out" else p for p in shared]
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name]) for p in own + shared]
    compare.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    app.command(name="compare")(compare)


@app.command()
def plot(
    runs: list[Path] = typer.Argument(..., help="Run directories, or compare directories (every cell)."),
    out: Path = typer.Option(Path("."), help="Folder for accuracy.png (or eval_loss.png) and communication.png."),
    title: str = typer.Option("", help="Title of the figures."),
) -> None:
    """Curves of accuracy (eval loss for --task instruct) against round and against MB sent, for any runs.

    RUNS: run directories, or compare directories (every cell, named by its method).
    """
    from hlora.compare import cell_labels, read_rows
    from hlora.plots import plot_groups

    groups: dict[str, list] = {}
    for path in runs:
        if (path / "metrics.jsonl").is_file():
            groups.setdefault(path.name, []).append(read_rows(path))
            continue
        cells = sorted(path.glob("*/seed*/metrics.jsonl"))
        if not cells:
            raise ConfigError(f"{path}: neither a run directory nor a compare directory (no metrics.jsonl)")
        labels = cell_labels(path)
        for m in cells:
            name = m.parent.parent.name
            groups.setdefault(labels.get(name, name), []).append(read_rows(m.parent))
    if not any(rows for runs in groups.values() for rows in runs):
        raise ConfigError("no round has finished in these runs yet: nothing to plot")
    out.mkdir(parents=True, exist_ok=True)
    for p in plot_groups(groups, out, title):
        console.print(f"wrote {p}")


_compare_signature()


@app.command(name="partition-stats")
def partition_stats(
    source: Path = typer.Argument(..., metavar="RUN_OR_CONFIG", help="A run directory, or a YAML/JSON config file."),
    out: Optional[Path] = typer.Option(
        None, help="Folder for partition.png.", show_default="the run directory; . for a config file"
    ),
    clients: Optional[int] = _opt("clients", "Number of clients."),
    partition: Optional[str] = _opt("partition", "How training data is split (as in hlora run)."),
    alpha: Optional[float] = _opt("alpha", "Dirichlet concentration."),
    classes_per_client: Optional[int] = _opt("classes_per_client", "Labels each client holds (pathological)."),
    shards_per_client: Optional[int] = _opt("shards_per_client", "Shards each client gets (shard)."),
    size_exponent: Optional[float] = _opt("size_exponent", "Power-law exponent of the client sizes (size)."),
    seed: Optional[int] = _opt("seed", "Seed of the split."),
) -> None:
    """Print and plot (partition.png) every client's size and label mix under a run's or config's split.

    RUN_OR_CONFIG: a run directory (its config.yaml) or a config file; the options override its split.
    """
    from hlora.data.partition_stats import partition_stats as stats

    overrides = {k: v for k, v in locals().items() if k not in ("source", "out", "stats")}
    if clients is not None:
        overrides["per_round"] = 1  # the split does not depend on it; a smaller --clients must not clash with it
    config = source / "config.yaml" if source.is_dir() else source
    if source.is_dir() and not config.is_file():
        raise ConfigError(f"{source}: not a run directory (no config.yaml)")
    cfg = load_config(config, overrides)
    folder = out if out is not None else (source if source.is_dir() else Path("."))
    table, png = stats(cfg, folder)
    print(table)
    console.print(f"wrote {png}")


#: --client of export, eval and predict
CLIENT_HELP = ("A personalised strategy's (fedsa) model of this client id: the global part with the client's own "
               "B and head.")


def _load(run_dir: Path, client: int | None) -> Any:
    """The run's global model, or ``client``'s own (with a note when that client was never sampled)."""
    from hlora.inference import load_run

    trained = load_run(run_dir, client)
    if not trained.trained:
        console.print(f"note: client {trained.client} was never sampled: its model is what the server would "
                      "first send it")
    return trained


@app.command()
def export(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="A run directory."),
    out: Path = typer.Option(..., help="Folder for the PEFT adapter."),
    rank: Optional[int] = typer.Option(None, help="Rank of the export (default: all of the update)."),
    client: Optional[int] = typer.Option(None, help=CLIENT_HELP),
) -> None:
    """Export the run's global model (or, with --client, one client's own model) at rank r as a PEFT adapter.

    RUN: a finished run directory. --out must be new or empty (nothing is overwritten).
    """
    from hlora.inference import export_run

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not empty; choose a new folder")
    kept = export_run(_load(run_dir, client), rank, out)
    console.print(f"wrote {out} (rank {rank or 'full'}): keeps {100 * kept:.2f}% of the update's energy")




@app.command(name="eval")
def eval_(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="A run directory."),
    rank: Optional[int] = typer.Option(None, help="Evaluate the best rank-r truncation (default: full)."),
    dev: Optional[list[Path]] = typer.Option(None, help="More evaluation files with the run's columns (its dev set is always evaluated)."),
    client: Optional[int] = typer.Option(None, help=CLIENT_HELP),
) -> None:
    """Evaluate a run's global model (or, with --client, one client's own model) on its dev set or other files.

    RUN: a run directory. The run's task data (GLUE, its --train/--dev files, or the hub) must be readable.
    With --client, the client's held-out examples (--personal-holdout) are scored too.
    """
    from hlora.inference import Predictor

    p = Predictor(_load(run_dir, client), rank)
    console.print(f"rank {rank or 'full'}: keeps {100 * p.energy:.2f}% of the update's energy")
    targets = [(f"{p.task.name} dev", None)] + [(str(f), p.read(f)) for f in dev or []]
    if client is not None:
        held = p.held_out()
        targets += [(f"client {client} held-out ({len(held)} examples)", held)] if len(held) else []
    for name, examples in targets:
        scores = p.evaluate(examples)
        console.print(f"{name}: " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()), highlight=False)


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="A run directory."),
    text: str = typer.Argument(..., help="The sentence (or the first of a pair); an instruction for an LM run."),
    second: Optional[str] = typer.Argument(None, help="The second sentence of a pair; an LM run: the input."),
    rank: Optional[int] = typer.Option(None, help="Use the best rank-r truncation (default: full)."),
    client: Optional[int] = typer.Option(None, help=CLIENT_HELP),
) -> None:
    """Classify one sentence or sentence pair with a run's global model (an LM run: respond to an instruction);
    with --client, with that client's own model.

    RUN: a run directory (its task data must be readable: the labels come from it). TEXT: the sentence, or the
    first of a pair (an LM run: the instruction). SECOND: the pair's second sentence (an LM run: the input).
    """
    from hlora.inference import Predictor

    p = Predictor(_load(run_dir, client), rank)
    if p.run.is_lm:
        print(p.respond(text, second))
        return
    label, probs = p.predict(text, second)
    detail = ", ".join(f"{n} {q:.3f}" for n, q in zip(p.task.label_names, probs))
    print(f"{label}\t({detail})")


def main() -> None:
    """Entry point: user mistakes print one line and exit 2, no traceback."""
    try:
        app()
    except USER_ERRORS as e:
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)  # [ ] kept as text
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
