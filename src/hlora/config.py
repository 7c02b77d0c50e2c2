"""The run configuration: one dataclass, read from YAML/JSON and command-line overrides."""

from __future__ import annotations

import json
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hlora.precision import PRECISIONS

#: the --partition methods (hlora.data.partition.METHODS; natural:COLUMN is written with its column)
PARTITIONS = ("iid", "dirichlet", "pathological", "shard", "size", "natural:COLUMN")


class ConfigError(ValueError):
    """An invalid option or config file (a user mistake, not a bug)."""


@dataclass
class RunConfig:
    """Everything a run depends on. Same config (and seed), same metrics."""

    # data
    task: str = "mrpc"
    train: str | None = None
    dev: str | None = None
    text_columns: list[str] | None = None
    label_column: str | None = None
    max_length: int = 128
    #: keep this many training examples, a seeded draw that is the same for every --seed (None: all), e.g. 6000
    #: of SST-2's 67,349 (hlora.data.subset_train)
    train_subset: int | None = None
    # instruction data (--task instruct): field names (default: Alpaca/Dolly names), generation metric
    prompt_field: str | None = None
    input_field: str | None = None
    response_field: str | None = None
    category_field: str | None = None
    gen_samples: int = 16
    max_new_tokens: int = 64
    # model and adapters
    model: str = "minilm"
    target_modules: list[str] | None = None
    ranks: str = "2-8"
    #: how clients get their ranks (hlora.ranks): uniform (LOW-HIGH, seeded), list (N,M,... cyclic), data (grows
    #: with the client's examples, between LOW and HIGH), file (--rank-file); None: uniform for LOW-HIGH, list else
    rank_policy: str | None = None
    #: a CSV of client,rank rows (--rank-policy file)
    rank_file: str | None = None
    #: per-layer ranks: {module pattern: rank spec}, e.g. {"query": "2-4", "value": "8"}; modules not named keep
    #: --ranks
    layer_ranks: dict[str, str] | None = None
    lora_alpha: float = 16.0
    dtype: str = "float32"
    #: the base model's dropout probability (hidden and attention) in local training; None: the checkpoint's
    #: own (--preset paper). 0 by default: as fast to learn over 8 rounds and faster to run (docs/results/learning.md)
    dropout: float | None = 0.0
    #: attention implementation: auto (eager on CPU, SDPA on a GPU), sdpa, eager; config.yaml keeps the choice
    attention: str = "auto"
    gradient_checkpointing: bool = False
    # federation
    strategy: str = "hlora"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    clients: int = 100
    per_round: int = 20
    rounds: int = 40
    #: how the training set is split (hlora.data.partition): dirichlet (over labels, alpha), iid, pathological
    #: (classes_per_client labels a client), shard (shards_per_client label-sorted shards a client), size
    #: (power-law sizes with size_exponent, labels IID), natural:COLUMN (one client per value of a column)
    partition: str = "dirichlet"
    alpha: float = 0.5
    classes_per_client: int = 2
    shards_per_client: int = 2
    size_exponent: float = 1.0
    # robustness: updates that fail the checks are rejected before aggregation
    min_clients: int = 1
    max_norm_ratio: float = 10.0
    #: a robust aggregation rule (hlora.robust): none, krum, multikrum, median, trimmed or normclip. f: the
    #: assumed number of Byzantine clients a round; m: multikrum's survivors (None: K - f); trim: the trimmed
    #: mean's beta (None: f / K); clip: normclip's fixed bound (None: clip_ratio x the round's median norm);
    #: dense_mb: the memory median and trimmed may take for one module's dense changes
    robust: str = "none"
    robust_f: int = 1
    robust_m: int | None = None
    robust_trim: float | None = None
    robust_clip: float | None = None
    robust_clip_ratio: float = 1.0
    robust_dense_mb: float = 2048.0
    #: simulated attackers (hlora.attacks; hlora run only): none, signflip, scale, noise or labelflip; the
    #: fraction of clients that attack (a seeded subset); L (None: 1 for signflip and noise, 5 for scale)
    attack: str = "none"
    attackers: float = 0.0
    attack_lambda: float | None = None
    #: client-level differential privacy (hlora.privacy; DP-FedAvg): clip (None or 0: off) bounds each client's
    #: change; noise is z (the noise multiplier), or None with epsilon_target (z then chosen by the accountant
    #: and recorded here); delta (None: 1 / clients^1.1); dense_mb: the memory one module's dense noisy change
    #: and its SVD may take; adaptive_clip: the target quantile of the change norms that C follows from dp_clip
    #: (Andrew et al. 2021; None: C stays dp_clip)
    dp_clip: float | None = None
    dp_noise: float | None = None
    dp_epsilon_target: float | None = None
    dp_delta: float | None = None
    dp_dense_mb: float = 2048.0
    dp_adaptive_clip: float | None = None
    # local training
    local_epochs: int = 2
    #: a fixed number of optimizer steps per client per round, cycling its data (overrides local_epochs)
    local_steps: int | None = None
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    #: the adapters' optimizer (adamw, sgd); the classification head's (adamw, sgd, frozen) and lr (None: --lr)
    client_opt: str = "adamw"
    #: AdamW's epsilon on the clients (larger: small gradients take proportionally small steps)
    adam_eps: float = 3e-5
    head_opt: str = "sgd"
    #: None: 0.1 for an SGD head (resolved by validate), --lr for an AdamW head
    head_lr: float | None = None
    batch_size: int = 8
    eval_batch_size: int = 128
    # client objective (hlora.objectives): logit adjustment tau, FedProx mu
    logit_adjust: float = 1.0
    prox_mu: float = 0.0
    # server optimizer (hlora.server_opt)
    #: None: avgm at server lr 2 for hlora and flexlora on classification tasks (where it was measured), avg
    #: for the others and for --task instruct (resolved by validate)
    server_opt: str | None = None
    server_lr: float | None = None
    server_momentum: float = 0.0
    server_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    server_tau: float = 1e-3
    server_rank: int = 64
    #: the aggregation weight of a client: examples (n_k / n, the papers') or uniform (1 / K)
    client_weights: str = "uniform"
    # speed: bf16 autocast of the frozen base (auto: where supported and faster), evaluation interval
    precision: str = "auto"
    eval_every: int = 1
    #: a personalised strategy (fedsa) holds out this seeded share of each client's examples to score the
    #: client's own model on (other strategies' splits are untouched)
    personal_holdout: float = 0.2
    #: score every strategy as a personalised one is: hold out the same share of each client's examples and
    #: score the client's model on it (a global strategy's: the global model), beside the dev set
    personal_eval: bool = False
    #: a named set of defaults (PRESETS) applied before the config file and the options
    preset: str | None = None
    seed: int = 0
    threads: int | None = None
    # outputs
    out: str | None = None
    #: experiment tracking (hlora.tracking): tensorboard, mlflow, wandb; the MLflow experiment and W&B group;
    #: the run's name there (None: the run directory's); the MLflow tracking URI (None: a store in OUT/mlruns)
    log: list[str] = field(default_factory=list)
    log_group: str | None = None
    log_name: str | None = None
    mlflow_uri: str | None = None
    # filled in by the run: each client's rank (its --ranks rank, for every layer no --layer-ranks pattern names)
    client_ranks: list[int] = field(default_factory=list)
    #: filled in by the run with --layer-ranks: each client's rank per pattern ([] without --layer-ranks)
    client_layer_ranks: list[dict[str, int]] = field(default_factory=list)

    def validate(self) -> "RunConfig":
        if self.clients < 1:
            raise ConfigError(f"--clients must be at least 1, got {self.clients}")
        if not 1 <= self.per_round <= self.clients:
            raise ConfigError(
                f"--per-round must be between 1 and --clients ({self.clients}), got {self.per_round}"
            )
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {self.rounds}")
        if self.min_clients < 1:
            raise ConfigError(f"--min-clients must be at least 1, got {self.min_clients}")
        if self.max_norm_ratio < 0:
            raise ConfigError(f"--max-norm-ratio must be >= 0 (0 turns the check off), got {self.max_norm_ratio}")
        from hlora.attacks import check_attack

        try:
            self.robust_rule().check(self.per_round)
            check_attack(self.attack, self.attackers, self.attack_lambda, pooled=self.strategy == "centralized",
                         classify=self.task != "instruct")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.robust != "none" and self.strategy == "centralized":
            raise ConfigError("--robust judges the clients' updates; the centralized strategy pools their data")
        if self.local_steps is not None and self.local_steps < 1:
            raise ConfigError(f"--local-steps must be at least 1, got {self.local_steps}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"--lr-schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.client_opt not in ("adamw", "sgd"):
            raise ConfigError(f"--client-opt must be adamw or sgd, got {self.client_opt!r}")
        if self.client_weights not in ("examples", "uniform"):
            raise ConfigError(f"--client-weights must be examples or uniform, got {self.client_weights!r}")
        if self.adam_eps <= 0:
            raise ConfigError(f"--adam-eps must be > 0, got {self.adam_eps}")
        if self.head_opt not in ("adamw", "sgd", "frozen"):
            raise ConfigError(f"--head-opt must be adamw, sgd or frozen, got {self.head_opt!r}")
        if self.head_lr is None and self.head_opt == "sgd":
            self.head_lr = DEFAULT_SGD_HEAD_LR
        if self.head_lr is not None and self.head_lr <= 0:
            raise ConfigError(f"--head-lr must be > 0, got {self.head_lr}")
        if self.logit_adjust < 0:
            raise ConfigError(f"--logit-adjust must be >= 0 (0: off), got {self.logit_adjust}")
        if self.prox_mu < 0:
            raise ConfigError(f"--prox-mu must be >= 0 (0: off), got {self.prox_mu}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.eval_every < 1:
            raise ConfigError(f"--eval-every must be at least 1, got {self.eval_every}")
        if not 0 < self.personal_holdout < 1:
            raise ConfigError(f"--personal-holdout must be in (0, 1), got {self.personal_holdout}")
        if self.personal_eval and self.task == "instruct":
            raise ConfigError("--personal-eval scores a classifier's accuracy on each client's held-out share; "
                              "--task instruct has none (its clients would only lose the held-out examples)")
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.server_opt is None:  # the measured default where it was measured, the plain rule elsewhere
            from hlora.server_opt import PRODUCT_SPACE

            measured = self.strategy in PRODUCT_SPACE and self.task != "instruct"
            self.server_opt = "avgm" if measured else "avg"
            if self.server_lr is None:
                self.server_lr = DEFAULT_SERVER_LR if measured else 1.0
        if self.server_lr is None:
            self.server_lr = 1.0
        try:
            self.server_optimizer().check(self.strategy)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.local_epochs < 1:
            raise ConfigError(f"--local-epochs must be at least 1, got {self.local_epochs}")
        if self.alpha <= 0:
            raise ConfigError(f"--alpha (the Dirichlet concentration) must be > 0, got {self.alpha}")
        if self.partition not in PARTITIONS and not (
            self.partition.startswith("natural:") and self.partition.partition(":")[2].strip()
        ):
            raise ConfigError(f"--partition must be one of {', '.join(PARTITIONS)}, got {self.partition!r}")
        if self.classes_per_client < 1:
            raise ConfigError(f"--classes-per-client must be at least 1, got {self.classes_per_client}")
        if self.shards_per_client < 1:
            raise ConfigError(f"--shards-per-client must be at least 1, got {self.shards_per_client}")
        if self.size_exponent <= 0:
            raise ConfigError(f"--size-exponent (the power law's) must be > 0, got {self.size_exponent}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        if self.train_subset is not None and self.train_subset < self.clients:
            raise ConfigError(f"--train-subset must keep at least one example a client (--clients "
                              f"{self.clients}), got {self.train_subset}")
        if self.max_length < 8:
            raise ConfigError(f"--max-length must be at least 8, got {self.max_length}")
        if self.gen_samples < 0:
            raise ConfigError(f"--gen-samples must be >= 0, got {self.gen_samples}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.attention not in ("auto", "sdpa", "eager"):
            raise ConfigError(f"--attention must be auto, sdpa or eager, got {self.attention!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        from hlora.tracking import BACKENDS

        self.log = list(dict.fromkeys(str(b).strip().lower() for b in self.log if str(b).strip()))
        for backend in self.log:
            if backend not in BACKENDS:
                raise ConfigError(f"--log takes {', '.join(BACKENDS)} (comma-separated), got {backend!r}")
        try:
            dp = self.privacy().check(strategy=self.strategy, clients=self.clients, per_round=self.per_round,
                                      rounds=self.rounds, robust=self.robust, client_weights=self.client_weights)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.dp_noise, self.dp_delta = dp.noise, dp.delta  # the resolved z and delta (config.yaml keeps them)
        parse_ranks(self.ranks)
        self.check_ranks()
        return self

    def client_parts(self, task, clients: int | None = None) -> list[list[int]]:
        """The indices of each client's training examples under ``--partition`` (``clients``: --clients).

        ``natural:COLUMN`` reads the column from the task's training file. Parameters that cannot split
        this data (K above the number of labels, a missing column, ...) are a ConfigError of one line."""
        from hlora.data import DataError, PartitionError, partition, read_column

        clients = self.clients if clients is None else clients
        groups = None
        if self.partition.startswith("natural:"):
            column = self.partition.partition(":")[2].strip()
            if task.train_file is None:
                raise ConfigError(f"--partition natural:{column} reads a column of the training file; "
                                  f"task {task.name!r} has none (give --train/--dev files)")
            try:
                groups = read_column(task.train_file, column)
            except DataError as e:
                raise ConfigError(f"--partition natural:{column}: {e}") from None
            if len(groups) != len(task.train):
                raise ConfigError(f"--partition natural:{column}: {task.train_file} has {len(groups)} rows "
                                  f"but {len(task.train)} training examples")
        try:
            return partition(task.train.labels, clients, self.partition, self.alpha, self.seed,
                             classes_per_client=self.classes_per_client, shards_per_client=self.shards_per_client,
                             size_exponent=self.size_exponent, groups=groups)
        except PartitionError as e:
            raise ConfigError(str(e)) from None

    def check_ranks(self) -> None:
        """--rank-policy, --rank-file and --layer-ranks agree with --ranks (the file is read: its mistakes
        show at once)."""
        from hlora.ranks import RANK_POLICIES, check_spec, layer_policy, parse_layer_ranks, policy_of, read_rank_file

        if self.rank_policy is not None and self.rank_policy not in RANK_POLICIES:
            raise ConfigError(f"--rank-policy must be one of {', '.join(RANK_POLICIES)}, got {self.rank_policy!r}")
        if self.rank_file is not None and self.rank_policy not in (None, "file"):
            raise ConfigError(f"--rank-file gives the ranks of --rank-policy file, not {self.rank_policy}")
        policy = policy_of(self)
        if policy == "file":
            if not self.rank_file:
                raise ConfigError("--rank-policy file needs --rank-file PATH (a CSV of client,rank rows)")
            read_rank_file(self.rank_file, self.clients)
        else:
            check_spec(self.ranks, policy, "--ranks")
        self.layer_ranks = parse_layer_ranks(self.layer_ranks) or None
        for pattern, spec in (self.layer_ranks or {}).items():
            check_spec(spec, layer_policy(self, spec), f"--layer-ranks {pattern}:")

    def client_lr(self, rnd: int) -> float:
        """The clients' learning rate in round ``rnd`` (``--lr-schedule``), for every engine."""
        if self.lr_schedule == "cosine":
            from hlora.objectives import cosine_lr

            return cosine_lr(self.lr, rnd, self.rounds)
        return self.lr

    def robust_rule(self):
        from hlora.robust import Robust

        return Robust(self.robust, self.robust_f, self.robust_m, self.robust_trim, self.robust_clip,
                      self.robust_clip_ratio, self.robust_dense_mb)

    def privacy(self):
        from hlora.privacy import DP

        return DP(self.dp_clip, self.dp_noise, self.dp_epsilon_target, self.dp_delta, self.dp_dense_mb,
                  self.dp_adaptive_clip)

    def server_optimizer(self):
        from hlora.server_opt import ServerOpt

        betas = tuple(float(b) for b in self.server_betas)
        return ServerOpt(self.server_opt, self.server_lr, self.server_momentum, betas, self.server_tau,
                         self.server_rank)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


#: the lr of an SGD head when --head-lr is not given
DEFAULT_SGD_HEAD_LR = 0.1

#: the server lr of the default server optimizer (avgm, momentum 0) on hlora and flexlora
DEFAULT_SERVER_LR = 2.0

#: named sets of defaults. ``paper``: the papers' client training (2 local epochs of plain cross-entropy,
#: the strategy's own server rule, a constant lr, the checkpoint's dropout), with no correction of the label
#: skew. The number of rounds is the federation's budget, not part of the preset.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "local_epochs": 2, "local_steps": None, "lr": 1e-3, "lr_schedule": "constant", "batch_size": 16,
        "client_opt": "adamw", "adam_eps": 1e-8, "head_opt": "adamw", "head_lr": None,
        "logit_adjust": 0.0, "prox_mu": 0.0, "server_opt": "avg", "server_lr": 1.0, "server_momentum": 0.0,
        "client_weights": "examples", "dropout": None,
    },
}

FIELDS = {f.name for f in fields(RunConfig)}
_HINTS = typing.get_type_hints(RunConfig)


def load_config(path: str | Path | None, overrides: dict[str, Any]) -> RunConfig:
    """Defaults, then the config file (YAML or JSON), then the overrides that are not None."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise ConfigError(f"{p}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of option: value")
        for key, value in loaded.items():
            name = str(key).replace("-", "_")
            if name not in FIELDS:
                raise ConfigError(f"{p}: unknown option {key!r}")
            values[name] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    preset = values.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        # the preset sits under the file and the options: what they set explicitly wins
        given = {k for k in values}
        values.update({k: v for k, v in PRESETS[preset].items() if k not in given})
    for key in ("text_columns", "target_modules", "server_betas", "log"):
        if isinstance(values.get(key), str):
            values[key] = [s.strip() for s in values[key].split(",") if s.strip()]
    if "server_betas" in values:
        try:
            values["server_betas"] = [float(b) for b in values["server_betas"]]
        except (TypeError, ValueError):
            raise ConfigError(f"--server-betas takes two numbers b1,b2; got {values['server_betas']!r}") from None
    opts = values.get("strategy_options")
    if isinstance(opts, str):  # "norm_weights=true, prune=true"
        opts = [x for x in opts.split(",") if x.strip()]
    if isinstance(opts, (list, tuple)):
        values["strategy_options"] = parse_options(opts)
    elif opts is not None and not isinstance(opts, dict):
        raise ConfigError(f"strategy_options takes a mapping (name: value) or KEY=VALUE pairs, got {opts!r}")
    if values.get("train") is not None and "task" not in values:  # name the run after the user's data
        values["task"] = Path(str(values["train"])).stem
    if "ranks" in values:
        values["ranks"] = str(values["ranks"])
    if values.get("rank_file") is not None:
        values["rank_file"] = str(values["rank_file"])
    values = {k: _coerce(k, v) for k, v in values.items()}
    try:
        return RunConfig(**values).validate()
    except TypeError as e:
        raise ConfigError(str(e)) from None


def parse_options(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["norm_weights=true", "x=3"]`` -> {"norm_weights": True, "x": 3} (values read as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = str(pair).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--strategy-option takes KEY=VALUE, got {pair!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value) if value.strip() else ""
    return out


def _coerce(name: str, value: Any) -> Any:
    """Numbers given as text (a YAML string, a METHOD:key=value override) become numbers; bad ones say so."""
    kind = _HINTS[name]
    if value is None or kind not in (int, float, int | None, float | None) or isinstance(value, bool):
        return value
    target = int if kind in (int, int | None) else float
    try:
        if target is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return target(value)
    except (TypeError, ValueError):
        what = "an integer" if target is int else "a number"
        raise ConfigError(f"option {name.replace('_', '-')} expects {what}, got {value!r}") from None


_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def parse_ranks(spec: str) -> tuple[str, list[int]]:
    """``"2-8"`` -> ("range", [2, 8]); ``"8"`` -> ("list", [8]); ``"2,4,8"`` -> ("list", [2, 4, 8])."""
    spec = str(spec)
    m = _RANGE.match(spec)
    if m:
        kind, values = "range", [int(m.group(1)), int(m.group(2))]
        if values[0] > values[1]:
            raise ConfigError(f"--ranks {spec}: the range is empty (low > high)")
    else:
        try:
            kind, values = "list", [int(x) for x in spec.split(",")]
        except ValueError:
            raise ConfigError(f"--ranks takes N, LOW-HIGH or a list N,M,...; got {spec!r}") from None
    if min(values) < 1:
        raise ConfigError(f"--ranks {spec}: a LoRA rank must be at least 1")
    return kind, values


def draw_ranks(spec: str, num_clients: int, seed: int) -> list[int]:
    """Each client's rank: uniform over LOW..HIGH (seeded), or a list assigned cyclically."""
    kind, values = parse_ranks(spec)
    if kind == "range":
        rng = np.random.default_rng([seed, 1])
        return rng.integers(values[0], values[1] + 1, size=num_clients).tolist()
    return [values[i % len(values)] for i in range(num_clients)]
