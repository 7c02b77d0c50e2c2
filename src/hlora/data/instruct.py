"""Instruction data for decoder models: JSONL rows of an instruction, an optional input and a response.

Field names follow the common data sets (Alpaca: ``instruction``/``input``/``output``; Dolly:
``instruction``/``context``/``response``/``category``) unless given. Each example becomes

    prompt = TEMPLATE(instruction, input);  tokens = prompt + response + EOS

and the loss is taken on the response tokens only (prompt positions get label -100).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from hlora.data.examples import DataError, TokenSequences, pad_rows
from hlora.data.files import read_json_objects

#: the Alpaca prompt, with and without an input
TEMPLATE = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
PROMPT_FIELDS = ("instruction", "prompt", "question")
INPUT_FIELDS = ("input", "context")
RESPONSE_FIELDS = ("output", "response", "answer", "completion")
CATEGORY_FIELDS = ("category", "task")
IGNORE = -100


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca template; the input block only when there is an input."""
    if input.strip():
        return TEMPLATE.format(
            with_input=", paired with an input that provides further context",
            instruction=instruction.strip(), input_block=f"### Input:\n{input.strip()}\n\n",
        )
    return TEMPLATE.format(with_input="", instruction=instruction.strip(), input_block="")


@dataclass
class InstructExamples:
    """One split: prompts (template applied), responses, and a category index per example."""

    prompts: list[str]
    responses: list[str]
    categories: list[int]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def labels(self) -> list[int]:
        """The partition's "labels": a Dirichlet split over them is a split by category (task)."""
        return self.categories

    def subset(self, indices: list[int]) -> InstructExamples:
        """The examples ``indices``, in that order (a node's share of a split)."""
        return InstructExamples([self.prompts[i] for i in indices], [self.responses[i] for i in indices],
                                [self.categories[i] for i in indices])


@dataclass
class Fields:
    prompt: str | None = None
    input: str | None = None
    response: str | None = None
    category: str | None = None

    @classmethod
    def of(cls, cfg) -> Fields:
        """The field options of a run config (``prompt_field``, ``input_field``, ...)."""
        return cls(cfg.prompt_field, cfg.input_field, cfg.response_field, cfg.category_field)


def read_instruct(path: str | Path, fields: Fields, category_names: list[str] | None = None
                  ) -> tuple[InstructExamples, list[str]]:
    """Read a JSONL file; returns the examples and the category names (sorted, from this file if not given).

    The prompt, input, response and category fields are the given names, or the first of the common names
    found in the first row. A missing prompt or response field is an error that names the line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise DataError(f"{path}: instruction data must be JSONL (one JSON object per line)")
    rows = read_json_objects(path)
    first = rows[0][1]
    prompt = fields.prompt or _first(first, PROMPT_FIELDS)
    response = fields.response or _first(first, RESPONSE_FIELDS)
    if prompt is None or response is None:
        raise DataError(
            f"{path}: cannot tell the prompt and response fields (found: {', '.join(first)}); "
            "name them with --prompt-field and --response-field"
        )
    input_field = fields.input or _first(first, INPUT_FIELDS)
    category = fields.category or _first(first, CATEGORY_FIELDS)
    prompts, responses, cats = [], [], []
    for line, obj in rows:
        for name in (prompt, response) + ((category,) if fields.category else ()):
            if name not in obj:
                raise DataError(f"{path} line {line}: no field {name!r}")
        inp = str(obj.get(input_field) or "") if input_field else ""
        prompts.append(format_prompt(str(obj[prompt]), inp))
        responses.append(str(obj[response]).strip())
        cats.append(str(obj.get(category, "")) if category else "")
    names = category_names if category_names is not None else sorted(set(cats))
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(cats) - set(index))
    if unknown:
        raise DataError(f"{path}: categories not in the training data: {', '.join(unknown[:5])}")
    return InstructExamples(prompts, responses, [index[c] for c in cats]), names


def _first(obj: dict, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in obj), None)


@dataclass
class EncodedLM(TokenSequences):
    """Token ids per example and per-token labels (-100 on the prompt); ``batch`` right-pads a selection."""

    input_ids: list[Tensor]
    labels: list[Tensor]
    prompt_lengths: list[int]
    pad_id: int

    def batch(self, indices: list[int] | Tensor) -> dict[str, Tensor]:
        idx = [int(i) for i in indices]
        input_ids, mask = pad_rows([self.input_ids[i] for i in idx], self.pad_id)
        labels, _ = pad_rows([self.labels[i] for i in idx], IGNORE)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def prompt(self, i: int) -> Tensor:
        """The prompt tokens of example ``i`` (what generation starts from)."""
        return self.input_ids[i][: self.prompt_lengths[i]]


def special_ids(tokenizer) -> tuple[int | None, int]:
    """(BOS or None, EOS): the tokenizer's own, or BERT-style [CLS]/[SEP] for a WordPiece tokenizer."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise DataError("the tokenizer has no end-of-sequence token (eos or sep)")
    return bos, eos


def encode_instruct(tokenizer, examples: InstructExamples, max_length: int) -> EncodedLM:
    """[BOS] prompt response EOS, truncated to ``max_length`` (the prompt loses its start first)."""
    bos, eos = special_ids(tokenizer)
    head = [bos] if bos is not None else []
    p_ids = tokenizer(examples.prompts, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(examples.responses, add_special_tokens=False)["input_ids"]
    ids, labels, plens = [], [], []
    for p, r in zip(p_ids, r_ids):
        r = r[: max_length - len(head) - 2] + [eos]  # room for at least one prompt token
        p = p[-(max_length - len(head) - len(r)):]
        tokens = head + p + r
        ids.append(torch.tensor(tokens, dtype=torch.long))
        labels.append(torch.tensor([IGNORE] * (len(head) + len(p)) + r, dtype=torch.long))
        plens.append(len(head) + len(p))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return EncodedLM(ids, labels, plens, pad)


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric runs (the tokenisation of Google's rouge-score without stemming)."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1): precision and recall of the longest common subsequence of tokens."""
    a, b = rouge_tokens(prediction), rouge_tokens(reference)
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)
