"""The embedded simulation: one process, one frozen base model, clients as adapters that come and go.

config -> data (load, tokenize once, partition) -> clients (local training) -> strategy (aggregate,
dispatch) -> metrics and artifacts. :func:`setup` builds everything a run needs; :func:`run` and
:func:`resume` drive the rounds in :func:`_rounds`, checkpointing after each one.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hlora.attacks import Attack, flip_labels
from hlora.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from hlora.client import train_client
from hlora.client_state import ClientStates, own_majority, personal_round, personal_scores, split_holdout
from hlora.config import ConfigError, RunConfig, load_config
from hlora.data import Encoded, EncodedLM, TaskData, task_of
from hlora.engine.outputs import finish_run, round_row
from hlora.factors import init_factors
from hlora.metrics import MetricsLog, dev_predictions, predict_logits
from hlora.model import FederatedModel
from hlora.objectives import Objective, label_counts, offset_from_counts
from hlora.precision import resolve_precision
from hlora.provenance import segments
from hlora.ranks import check_patterns, client_ranks, module_ranks
from hlora.server import client_seed, server_round
from hlora.strategies import ClientSpec, GlobalState, Strategy, Update, get_strategy
from hlora.tasks import is_lm, load_model, peft_task_type, score, tokenize
from hlora.tracking import check_installed, open_tracking


class Reporter:
    """Progress callbacks; the default one is silent (the CLI shows bars and round lines)."""

    def start(self, cfg: RunConfig, out: Path, first_round: int) -> None: ...
    def round_start(self, round: int, examples: int) -> None: ...
    def advance(self, examples: int) -> None: ...
    def round_end(self, row: dict[str, Any]) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...


@dataclass
class RunResult:
    out: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Experiment:
    """Everything a run needs, built once: data, the one base model, clients, the strategy."""

    cfg: RunConfig
    task: TaskData
    fm: FederatedModel
    train: Encoded | EncodedLM
    dev: Encoded | EncodedLM
    parts: list[list[int]]
    clients: list[ClientSpec]
    strategy: Strategy
    tokenizer: Any = None
    #: each client's logit adjustment tau * (log pi_k - log pi) (classification with --logit-adjust)
    offsets: list[torch.Tensor] | None = None
    #: simulated attackers (--attack), and the training set with flipped labels (--attack labelflip)
    attack: Attack | None = None
    flipped: Encoded | None = None
    #: each client's held-out examples (a personalised strategy, or --personal-eval: the client's model is scored
    #: on them), else None
    holdout: list[list[int]] | None = None

    def objective(self, client: int) -> Objective:
        """Client ``client``'s training loss (``-1``: the pooled, centralized site: the plain loss)."""
        offset = self.offsets[client] if self.offsets is not None and client >= 0 else None
        return Objective(offset=offset, prox_mu=self.cfg.prox_mu)

    def training_set(self, client: int) -> Encoded | EncodedLM:
        """What client ``client`` trains on: the training set, or its copy with flipped labels (an attacker
        of --attack labelflip)."""
        return self.flipped if self.attack is not None and self.attack.flips(client) else self.train

    @property
    def max_rank(self) -> int:
        """The largest rank of any client in any module (the rank of the shared initialisation)."""
        return max(r for c in self.clients for r in c.ranks.values())

    def pooled_ranks(self) -> dict[str, int]:
        """The centralized site's rank per module: the largest any client holds there."""
        return {m: max(c.ranks[m] for c in self.clients) for m in self.fm.shapes}

    def all_ranks(self) -> list[int]:
        """Every rank some client holds in some module, ascending."""
        return sorted({r for c in self.clients for r in c.ranks.values()})

    def initial_state(self) -> GlobalState:
        init = init_factors(self.fm.shapes, self.max_rank, torch.Generator().manual_seed(self.cfg.seed))
        return self.strategy.init_state(init, self.fm.head_state())

    def evaluate(self, adapter, head: dict[str, torch.Tensor]) -> dict[str, float]:
        """The global model W0 + adapter on the dev set: accuracy (and F1), or for an LM the eval loss,
        perplexity and ROUGE-L."""
        return score(self.cfg, self.task, self.fm, self.tokenizer, adapter, head, self.task.dev, self.dev)

    def predictions(self, adapter, head: dict[str, torch.Tensor]) -> dict[str, list[int]]:
        """The predicted and gold label of every dev example (a classifier)."""
        return dev_predictions(self.fm, adapter, head, self.dev, self.cfg.eval_batch_size)


def local_examples(n: int, cfg: RunConfig, steps: int | None) -> int:
    """Examples a client of ``n`` examples trains on in a round with ``steps`` optimizer steps (about: a
    pass's last batch may be short), or with --local-epochs when ``steps`` is None."""
    return steps * min(cfg.batch_size, n) if steps else cfg.local_epochs * n


def default_out(cfg: RunConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.task}-{cfg.strategy}"


def check_strategy(cfg: RunConfig) -> Strategy:
    """The configured strategy, checked against the clients' ranks before any data or model is loaded."""
    strategy = get_strategy(cfg.strategy, **cfg.strategy_options)
    if strategy.personal and cfg.robust != "none":
        raise ConfigError(f"--robust judges the clients' changes of s B A; strategy {cfg.strategy} sends A only, "
                          "so the server cannot form them")
    ranks, layers = client_ranks(cfg)  # the data policy's sizes are not known yet: setup checks again
    strategy.check([ClientSpec(i, {"*": r, **(layers[i] if layers else {})}, cfg.lora_alpha, 1)
                    for i, r in enumerate(ranks)])
    return strategy


def setup(cfg: RunConfig) -> Experiment:
    """Load and tokenize the data once, partition it, load the base model, give each client a rank."""
    cfg.validate()
    check_installed(cfg.log)  # a --log backend that is not installed fails before anything loads
    strategy = check_strategy(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    else:  # record it: float reductions, hence exact resumes, depend on the thread count
        cfg.threads = torch.get_num_threads()
    task = task_of(cfg)
    if cfg.clients > len(task.train):
        raise ConfigError(f"--clients {cfg.clients} exceeds the {len(task.train)} training examples")
    parts = cfg.client_parts(task)  # a split this data cannot take is refused before the model loads
    holdout = None
    if strategy.personal or cfg.personal_eval:  # each client's model is scored on a held-out share of its examples
        parts, holdout = split_holdout(parts, cfg.personal_holdout, cfg.seed)
    model, tokenizer = load_model(cfg, task)
    fm = FederatedModel(model, cfg.target_modules)
    cfg.robust_rule().check_dense(fm.shapes, cfg.per_round)  # median/trimmed: refused where they do not fit
    cfg.privacy().check_dense(fm.shapes, cfg.strategy)  # DP's dense noisy change: likewise
    ranks, layers = client_ranks(cfg, [len(p) for p in parts])
    if cfg.client_ranks and cfg.client_ranks != ranks:
        raise ConfigError("the config's client_ranks do not match its --ranks and --seed")
    if cfg.client_layer_ranks and cfg.client_layer_ranks != layers:
        raise ConfigError("the config's client_layer_ranks do not match its --layer-ranks and --seed")
    cfg.client_ranks, cfg.client_layer_ranks = ranks, layers
    modules = list(fm.shapes)
    check_patterns(modules, list(cfg.layer_ranks or {}))
    clients = [
        ClientSpec(i, module_ranks(modules, r, layers[i] if layers else {}), cfg.lora_alpha, len(parts[i]))
        for i, r in enumerate(ranks)
    ]
    for c in clients:  # the largest rank above a layer's width, the first such client and layer
        m = max(c.ranks, key=lambda m: c.ranks[m] - min(fm.shapes[m]))
        if c.ranks[m] > min(fm.shapes[m]):
            raise ConfigError(f"rank {c.ranks[m]} is above the width {min(fm.shapes[m])} of the adapted layers "
                              f"(client {c.id}, {m})")
    strategy.check(clients)
    train = tokenize(task, tokenizer, task.train, cfg.max_length)
    dev = tokenize(task, tokenizer, task.dev, cfg.max_length)
    attack = Attack.of(cfg.attack, cfg.attackers, cfg.attack_lambda, cfg.clients, cfg.seed)
    flipped = None
    if attack is not None and attack.kind == "labelflip":
        flipped = dataclasses.replace(train, labels=flip_labels(train.labels, task.num_labels))
    offsets = None
    if cfg.logit_adjust and task.kind != "instruct":
        labels = task.train.labels
        federation = label_counts(labels, task.num_labels)  # counted once, not once per client
        offsets = [
            offset_from_counts(label_counts([labels[i] for i in part], task.num_labels), federation,
                               cfg.logit_adjust)
            for part in parts
        ]
        for k in attack.attackers if flipped is not None else []:  # the label mix a flipping attacker trains on
            offsets[k] = offset_from_counts(label_counts(flipped.labels[parts[k]], task.num_labels), federation,
                                            cfg.logit_adjust)
    exp = Experiment(cfg, task, fm, train, dev, parts, clients, strategy, tokenizer, offsets, attack, flipped,
                     holdout)
    cfg.precision = fm.precision = resolve_precision(cfg.precision, lambda mode: _probe_step(exp, mode))
    return exp


def _probe_step(exp: Experiment, precision: str, batches: int = 2) -> None:
    """A few training batches of the first client at ``precision`` (for ``--precision auto``); the model
    is left as it was."""
    exp.fm.precision = precision
    spec = exp.clients[0]
    payload = exp.strategy.dispatch(exp.initial_state(), spec, torch.Generator().manual_seed(0))
    train_client(exp.fm, payload, exp.train, exp.parts[0], client_id=0, epochs=1, lr=exp.cfg.lr,
                 batch_size=exp.cfg.batch_size, seed=0, local_steps=batches)


def prepare_out(out: Path, create: bool = True) -> Path:
    """Create the run directory; refuse one that already holds a run (nothing is overwritten)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if any((out / name).exists() for name in ("config.yaml", "metrics.jsonl", "summary.json", CHECKPOINT)):
        raise ConfigError(
            f"--out {out} already holds a run; choose another directory, or continue it with --resume {out}"
        )
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def run(cfg: RunConfig, reporter: Reporter | None = None) -> RunResult:
    """Run a federated fine-tuning experiment as configured; write its outputs under ``cfg.out``."""
    out = prepare_out(Path(cfg.out) if cfg.out else default_out(cfg), create=False)  # refuse before loading
    exp = setup(cfg)
    out = prepare_out(out)
    cfg.out = str(out)
    cfg.save(out / "config.yaml")
    sampler = np.random.default_rng([cfg.seed, 2])
    with open_tracking(cfg, out, resume=False) as tracker:
        log = MetricsLog(out, tracker=tracker)
        return _rounds(exp, out, exp.initial_state(), sampler, log, 0.0, reporter or Reporter(), ClientStates(),
                       code=segments(None, resumed=False))


def written_before(path: Path) -> dict[str, Any]:
    """What a run directory written before an option existed trained with, where today's default differs:
    no ``logit_adjust`` in its config.yaml means what is now ``--preset paper`` in float32; no
    ``attention`` means SDPA; no ``dropout`` the checkpoint's dropout (None). Resume it that way, not with
    today's defaults."""
    import yaml

    saved = yaml.safe_load(path.read_text()) or {}
    if not isinstance(saved, dict):
        return {}
    implied: dict[str, Any] = {}
    if "logit_adjust" not in saved and "preset" not in saved:
        implied.update(preset="paper", precision="fp32")
    if "attention" not in saved:
        implied["attention"] = "sdpa"
    if "dropout" not in saved:
        implied["dropout"] = None
    return implied


def resume(out: str | Path, reporter: Reporter | None = None) -> RunResult:
    """Continue a run that stopped (even killed mid-round) from its last checkpoint.

    Rounds after the checkpoint are recomputed; the metrics match, round by round, those of the run
    that was never interrupted.
    """
    out = Path(out)
    if not (out / "config.yaml").is_file():
        raise ConfigError(f"--resume {out}: no run there (config.yaml is missing)")
    if (out / "summary.json").exists():
        raise ConfigError(f"--resume {out}: this run has already finished")
    implied = written_before(out / "config.yaml")
    cfg = load_config(out / "config.yaml", {"out": str(out), **implied})
    for key, value in implied.items():
        if value is None:  # an override of None means "not given" to load_config
            setattr(cfg, key, None)
    exp = setup(cfg)
    sampler = np.random.default_rng([cfg.seed, 2])
    if (out / CHECKPOINT).exists():
        state, saved = load_checkpoint(out)
        if saved["client_ranks"] != cfg.client_ranks or saved["partition"] != exp.parts:
            raise ConfigError(f"--resume {out}: the checkpoint does not belong to this config")
        sampler.bit_generator.state = saved["sampler"]
        rows, wall = saved["rows"], saved["wall_seconds"]
        states = ClientStates.from_state_dict(saved.get("client_states"))
        code = segments(saved.get("provenance"), resumed=True)
    else:  # killed during the first round
        state, rows, wall, states = exp.initial_state(), [], 0.0, ClientStates()
        code = segments(None, resumed=False)
    with open_tracking(cfg, out, resume=True) as tracker:  # the same tracked runs, continued
        log = MetricsLog(out, rows, tracker)  # rewrites metrics.jsonl to the checkpoint's rounds
        return _rounds(exp, out, state, sampler, log, wall, reporter or Reporter(), states, code)


def _rounds(
    exp: Experiment,
    out: Path,
    state: GlobalState,
    sampler: np.random.Generator,
    log: MetricsLog,
    wall_before: float,
    reporter: Reporter,
    states: ClientStates,
    code: list[dict[str, Any]],
) -> RunResult:
    cfg, strategy, fm = exp.cfg, exp.strategy, exp.fm
    reporter.start(cfg, out, state.round + 1)
    server_opt = cfg.server_optimizer()
    dp = cfg.privacy()
    t_run = time.perf_counter()
    for rnd in range(state.round + 1, cfg.rounds + 1):
        t0 = time.perf_counter()
        sampled = sorted(sampler.choice(cfg.clients, cfg.per_round, replace=False).tolist())
        if strategy.pools_clients:  # centralized: the round's data pooled at one site
            pooled = sorted(i for c in sampled for i in exp.parts[c])
            spec = ClientSpec(-1, exp.pooled_ranks(), cfg.lora_alpha, len(pooled))
            jobs = [(spec, pooled)]
            # as many optimizer steps as the federated round takes in all (each client's --local-steps)
            steps = cfg.local_steps and cfg.local_steps * len(sampled)
        else:
            jobs = [(exp.clients[c], exp.parts[c]) for c in sampled]
            steps = cfg.local_steps
        indices = {spec.id: ix for spec, ix in jobs}
        reporter.round_start(rnd, sum(local_examples(len(ix), cfg, steps) for _, ix in jobs))

        def execute(pairs: list[tuple[ClientSpec, Any]]) -> list[Update | Exception]:
            results: list[Update | Exception] = []
            for spec, payload in pairs:
                def train(payload, spec=spec) -> Update:
                    return train_client(
                        fm, payload, exp.training_set(spec.id), indices[spec.id], client_id=spec.id,
                        epochs=cfg.local_epochs,
                        lr=cfg.client_lr(rnd), batch_size=cfg.batch_size, seed=client_seed(cfg.seed, rnd, spec.id),
                        on_batch=reporter.advance, local_steps=steps, objective=exp.objective(spec.id),
                        head_opt=cfg.head_opt, head_lr=cfg.head_lr, client_opt=cfg.client_opt,
                        adam_eps=cfg.adam_eps,
                    )

                try:  # a personalised strategy's client trains with what it kept, and keeps part of the result
                    update = personal_round(strategy, states, spec.id, payload, train) if strategy.personal \
                        else train(payload)
                    results.append(exp.attack.tamper(update, payload, rnd) if exp.attack else update)
                except Exception as e:  # a failing client is dropped from the round; the run goes on
                    results.append(e)
            return results

        outcome = server_round(
            strategy, state, [spec for spec, _ in jobs], execute, round=rnd, seed=cfg.seed,
            min_clients=cfg.min_clients, max_norm_ratio=cfg.max_norm_ratio, server_opt=server_opt,
            client_weights=cfg.client_weights, robust=cfg.robust_rule(), dp=dp,
        )
        state = outcome.state
        scored = rnd % cfg.eval_every == 0 or rnd == cfg.rounds
        reported = outcome  # a personalised strategy: the dev set scores the mean of the clients' models
        if strategy.personal:
            reported = dataclasses.replace(outcome, state=strategy.mean_state(state, exp.clients, states.entries))
        row = round_row(
            rnd, reported, strategy=strategy, evaluate=exp.evaluate if scored else None, client_ranks=exp.all_ranks(),
            clients=sampled, ranks=[max(spec.ranks.values()) for spec, _ in jobs], started=t0,
        )
        if exp.holdout is not None and scored:
            row.update(_personal_scores(exp, state, states))
        if exp.attack is not None:  # which attackers were sampled, and which clients were rejected
            row.update(exp.attack.row(sampled, outcome.rejected))
        if dp.on:  # epsilon spent so far at --dp-delta (None: no noise, unbounded)
            row["dp_epsilon"] = dp.epsilon(cfg.per_round / cfg.clients, rnd)
        log.append(row)
        save_checkpoint(
            out, state, sampler=sampler.bit_generator.state, rows=log.rows, client_ranks=cfg.client_ranks,
            partition=exp.parts, wall_seconds=wall_before + time.perf_counter() - t_run, provenance=code,
            **({"client_states": states.state_dict()} if strategy.personal else {}),
        )
        reporter.round_end(row)

    final = strategy.mean_state(state, exp.clients, states.entries) if strategy.personal else state
    summary = finish_run(
        out, strategy, final, log, model=cfg.model, task=exp.task.name, strategy_name=cfg.strategy,
        wall_seconds=wall_before + time.perf_counter() - t_run,
        task_type=peft_task_type(cfg), predictions=None if is_lm(cfg) else exp.predictions,
        extra={**(dp.summary(cfg.per_round / cfg.clients, cfg.rounds) or {}), **_personal_baseline(exp)} or None,
        code=code,
    )
    reporter.finish(summary)
    return RunResult(out, summary, log.rows)


def _personal_baseline(exp: Experiment) -> dict[str, float]:
    """With held-out shares (a classifier): ``personal_majority``, each client's own majority label on them."""
    if is_lm(exp.cfg) or exp.holdout is None:
        return {}
    share = own_majority(exp.task.train.labels, exp.parts, exp.holdout)
    return {} if share is None else {"personal_majority": share}


def _personal_scores(exp: Experiment, state: GlobalState, states: ClientStates) -> dict[str, Any]:
    """Every client's own model on its held-out examples (a classifier; an LM run has none of these keys);
    with logit adjustment also ``personal_accuracy_prior``: the same logits plus the client's training offset
    tau (log pi_k - log pi), i.e. the prediction for the client's own label mix that its training fitted."""
    if is_lm(exp.cfg) or exp.holdout is None:
        return {}
    train = exp.train

    def correct(model, client: int, idx: list[int]) -> dict[str, int]:
        data = Encoded([train.input_ids[i] for i in idx],
                       None if train.token_type_ids is None else [train.token_type_ids[i] for i in idx],
                       train.labels[idx], train.pad_id)
        logits = predict_logits(exp.fm, model.lora, model.head, data, exp.cfg.eval_batch_size)
        counts = {"personal_accuracy": int((logits.argmax(-1) == data.labels).sum())}
        if exp.offsets is not None:  # the client's own label prior, as it trained with it (logit adjustment)
            adjusted = logits + exp.offsets[client].to(logits.dtype)
            counts["personal_accuracy_prior"] = int((adjusted.argmax(-1) == data.labels).sum())
        return counts

    return personal_scores(exp.strategy, state, exp.clients, states, exp.holdout, correct)
