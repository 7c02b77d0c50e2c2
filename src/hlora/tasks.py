"""What depends on the kind of task: the model class, tokenization, evaluation, the PEFT task type.

Two kinds: ``classify`` (a sentence or pair -> a label; an encoder with a classification head) and
``instruct`` (a prompt -> a response; a decoder LM). The simulation and ``hlora eval/predict/export``
both go through these functions, so a kind is handled in one place.
"""

from __future__ import annotations

from typing import Any

from hlora.config import RunConfig
from hlora.data import TaskData, encode, encode_instruct
from hlora.factors import Adapter
from hlora.metrics import evaluate, evaluate_lm
from hlora.model import DEFAULT_MODEL, FederatedModel, ModelError, configure, load_causal_lm, load_classifier

INSTRUCT = "instruct"


def is_lm(cfg: RunConfig) -> bool:
    """Whether a run trains a decoder LM (``--task instruct``)."""
    return cfg.task == INSTRUCT


def peft_task_type(cfg: RunConfig) -> str:
    """PEFT's ``task_type`` of the exported adapter."""
    return "CAUSAL_LM" if is_lm(cfg) else "SEQ_CLS"


def load_model(cfg: RunConfig, task: TaskData):
    """The base model for the task (a causal LM or a sequence classifier) and its tokenizer."""
    if task.kind == INSTRUCT:
        if cfg.model == DEFAULT_MODEL:
            raise ModelError("--task instruct needs a decoder language model: give --model PATH_OR_ID")
        model, tokenizer = load_causal_lm(cfg.model, cfg.seed, cfg.dtype, cfg.gradient_checkpointing)
    else:
        model, tokenizer = load_classifier(cfg.model, task.num_labels, cfg.seed)
    cfg.attention = configure(model, cfg.dropout, cfg.attention)  # the choice goes into config.yaml
    return model, tokenizer


def tokenize(task: TaskData, tokenizer, examples, max_length: int):
    """Examples of the task, tokenized once (``Encoded``, or ``EncodedLM`` with response-only labels)."""
    return (encode_instruct if task.kind == INSTRUCT else encode)(tokenizer, examples, max_length)


def score(
    cfg: RunConfig, task: TaskData, fm: FederatedModel, tokenizer, adapter: Adapter,
    head: dict[str, Any], examples, data,
) -> dict[str, float]:
    """The model W0 + adapter on ``examples`` (tokenized as ``data``): accuracy (and F1) for a classifier;
    eval loss, perplexity and ROUGE-L for an LM."""
    if task.kind == INSTRUCT:
        return evaluate_lm(fm, adapter, data, cfg.eval_batch_size, tokenizer, examples.responses,
                           cfg.gen_samples, cfg.max_new_tokens)
    return evaluate(fm, adapter, head, data, cfg.eval_batch_size, task.f1_label)
