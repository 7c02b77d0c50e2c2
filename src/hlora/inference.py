"""Use a finished (or checkpointed) run: export at any rank, evaluate, predict."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hlora.checkpoint import CHECKPOINT, load_checkpoint
from hlora.client_state import ClientStates, split_holdout
from hlora.config import ConfigError, RunConfig, load_config
from hlora.data import Fields, encode, read_split, task_of
from hlora.data.examples import Examples
from hlora.data.instruct import InstructExamples, format_prompt, read_instruct
from hlora.export import adapter_svd, save_peft_adapter, truncated
from hlora.factors import Adapter, Factor
from hlora.metrics import generate, predict_logits
from hlora.model import FederatedModel, resolve_model_path
from hlora.ranks import module_ranks
from hlora.strategies import ClientSpec, get_strategy
from hlora.tasks import is_lm, load_model, peft_task_type, score, tokenize


@dataclass
class TrainedRun:
    """A run's config and its global model: W0 + ``adapter``, with ``head``."""

    cfg: RunConfig
    adapter: Adapter
    head: dict[str, torch.Tensor]
    round: int
    #: whose model this is: None for the global model; a client id for a personalised strategy's client model
    client: int | None = None
    #: False for a client that was never sampled (its model is what the server would first send it)
    trained: bool = True

    @property
    def is_lm(self) -> bool:
        return is_lm(self.cfg)

    def truncated(self, rank: int | None) -> tuple[Adapter, float]:
        """The best rank-``rank`` truncation of every module's update (None: all of it), energy kept."""
        if rank is not None and rank < 1:
            raise ConfigError(f"--rank must be at least 1, got {rank}")
        return truncated(adapter_svd(self.adapter), rank)


def load_run(run_dir: str | Path, client: int | None = None) -> TrainedRun:
    """A run's global model, or with ``client`` a personalised strategy's model of that client: the
    server's part of it (FedSA-LoRA: the global A at the client's rank) with what the client kept (its own B
    and head) after its last round, as ``client_personal_accuracy`` scored it."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / CHECKPOINT).is_file():
        raise ConfigError(f"{run_dir}: not a run directory with a checkpoint (config.yaml, {CHECKPOINT})")
    cfg = load_config(run_dir / "config.yaml", {})
    state, saved = load_checkpoint(run_dir)
    strategy = get_strategy(cfg.strategy, **cfg.strategy_options)
    if client is not None and not strategy.personal:
        raise ConfigError(f"--client: strategy {cfg.strategy} trains one global model, which every client "
                          "receives; leave --client out")
    if not strategy.personal:
        return TrainedRun(cfg, strategy.global_adapter(state), state.head, state.round)
    if "client_states" not in saved:  # Flower: each node keeps its own B; the server holds A only
        raise ConfigError(f"{run_dir}: a {cfg.strategy} run whose clients kept their own state (Flower nodes): "
                          "the server holds no model of theirs to load; its scores are the rows' personal_accuracy")
    kept = ClientStates.from_state_dict(saved["client_states"])
    parts = saved["partition"]
    if client is not None:
        if not 0 <= client < len(parts):
            raise ConfigError(f"--client must be a client id in 0..{len(parts) - 1}, got {client}")
        ranks = cfg.client_ranks[client]
        layers = cfg.client_layer_ranks[client] if cfg.client_layer_ranks else {}
        spec = ClientSpec(client, module_ranks(list(state.lora), ranks, layers), cfg.lora_alpha, len(parts[client]))
        model = strategy.personal_model(state, spec, kept.get(client))
        return TrainedRun(cfg, with_frozen(model.lora, model.frozen), model.head, state.round, client,
                          client in kept)
    # the mean of the clients' own models, as the run scored and exported it
    clients = [ClientSpec(i, {}, cfg.lora_alpha, len(part)) for i, part in enumerate(parts)]
    state = strategy.mean_state(state, clients, kept.entries)
    return TrainedRun(cfg, strategy.global_adapter(state), state.head, state.round)


def with_frozen(lora: Adapter, frozen: Adapter) -> Adapter:
    """One adapter for a client's whole update: its trainable factors plus any frozen low-rank part, stacked
    (s1 B1 A1 + s2 B2 A2 = [s1 B1, s2 B2] [A1; A2] at scale 1)."""
    out = dict(lora)
    for m, f in frozen.items():
        if m in out:
            g = out[m]
            out[m] = Factor(torch.cat([g.B * g.scale, f.B * f.scale], 1), torch.cat([g.A, f.A], 0), 1.0)
        else:
            out[m] = f
    return out


def export_run(run: TrainedRun, rank: int | None, out: Path) -> float:
    """Write the (rank-truncated) global model as a PEFT adapter; return the energy fraction kept."""
    adapter, kept = run.truncated(rank)
    save_peft_adapter(out, adapter, run.head, resolve_model_path(run.cfg.model), peft_task_type(run.cfg))
    return kept


class Predictor:
    """The run's base model with its global adapter (optionally truncated), ready to score text."""

    def __init__(self, run: TrainedRun, rank: int | None = None) -> None:
        self.run = run
        cfg = run.cfg
        self.task = task_of(cfg)
        model, self.tokenizer = load_model(cfg, self.task)
        self.fm = FederatedModel(model, cfg.target_modules)
        self.adapter, self.energy = run.truncated(rank)

    def read(self, path: str | Path):
        """Another evaluation file with the run's columns (or instruction fields)."""
        if self.run.is_lm:
            return read_instruct(path, Fields.of(self.run.cfg))[0]
        return read_split(path, self.task)

    def held_out(self):
        """The run's client's held-out examples (``--personal-holdout``): what its personal score used."""
        cfg = self.run.cfg
        if self.run.client is None:
            raise ConfigError("held-out examples belong to a client: give --client")
        held = split_holdout(cfg.client_parts(self.task), cfg.personal_holdout, cfg.seed)[1][self.run.client]
        return self.task.train.subset(held)

    def evaluate(self, examples=None) -> dict[str, float]:
        cfg = self.run.cfg
        examples = examples or self.task.dev
        data = tokenize(self.task, self.tokenizer, examples, cfg.max_length)
        return score(cfg, self.task, self.fm, self.tokenizer, self.adapter, self.run.head, examples, data)

    def predict(self, text_a: str, text_b: str | None = None) -> tuple[str, list[float]]:
        pair = self.task.train.text_b is not None
        if pair and text_b is None:
            raise ConfigError("this task classifies sentence pairs: give two sentences")
        if not pair and text_b is not None:
            raise ConfigError("this task classifies single sentences: give one sentence")
        data = encode(self.tokenizer, Examples([text_a], [text_b] if pair else None, [0]), self.run.cfg.max_length)
        probs = predict_logits(self.fm, self.adapter, self.run.head, data, 1).softmax(-1)[0]
        return self.task.label_names[int(probs.argmax())], probs.tolist()

    def respond(self, instruction: str, input: str | None = None) -> str:
        """The global LM's greedy response to an instruction (and optional input), in the run's template."""
        example = InstructExamples([format_prompt(instruction, input or "")], [""], [0])
        ids = tokenize(self.task, self.tokenizer, example, self.run.cfg.max_length).prompt(0)  # as in training
        self.fm.install(self.adapter, {})
        self.fm.model.eval()
        try:
            with torch.inference_mode():
                return generate(self.fm.model, self.tokenizer, ids, self.run.cfg.max_new_tokens)
        finally:
            self.fm.clear()
