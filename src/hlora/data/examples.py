"""Labelled text examples, and their tokenized form (tokenized once per run)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor


class DataError(ValueError):
    """Bad data input: a missing file, a malformed row, an unknown task (a user mistake)."""


@dataclass
class Examples:
    """One split: a sentence (or a pair) and an integer label per example."""

    text_a: list[str]
    text_b: list[str] | None
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: list[int]) -> "Examples":
        return Examples(
            [self.text_a[i] for i in indices],
            None if self.text_b is None else [self.text_b[i] for i in indices],
            [self.labels[i] for i in indices],
        )


@dataclass
class TaskData:
    """A task's train and dev splits and what its labels mean.

    ``kind`` is ``classify`` (sentence or pair -> label, an encoder with a classification head) or
    ``instruct`` (prompt -> response, a decoder LM; ``label_names`` are then the categories).
    """

    name: str
    train: Any
    dev: Any
    label_names: list[str]
    #: the label whose F1 is reported (the positive class), or None
    f1_label: int | None = None
    #: the file columns the examples were read from
    text_columns: list[str] | None = None
    label_column: str | None = None
    kind: str = "classify"
    #: the file the training split was read from (``natural:COLUMN`` partitions read a column of it), or None
    train_file: str | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


class TokenSequences:
    """A tokenized split: ``input_ids`` (one unpadded tensor per example) and their lengths."""

    input_ids: list[Tensor]

    def __len__(self) -> int:
        return len(self.input_ids)

    @cached_property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.input_ids]


@dataclass
class Encoded(TokenSequences):
    """Token ids per example (unpadded) and labels; ``batch`` pads a selection."""

    input_ids: list[Tensor]
    token_type_ids: list[Tensor] | None
    labels: Tensor
    pad_id: int

    def batch(self, indices: list[int] | Tensor) -> dict[str, Tensor]:
        idx = [int(i) for i in indices]
        input_ids, mask = pad_rows([self.input_ids[i] for i in idx], self.pad_id)
        out = {"input_ids": input_ids, "attention_mask": mask, "labels": self.labels[idx]}
        if self.token_type_ids is not None:
            out["token_type_ids"] = pad_rows([self.token_type_ids[i] for i in idx], 0)[0]
        return out


def pad_rows(rows: list[Tensor], value: int) -> tuple[Tensor, Tensor]:
    """Right-pad 1-d integer tensors with ``value`` into a matrix; also the 0/1 mask of real positions."""
    width = max(len(t) for t in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, t in enumerate(rows):
        out[row, : len(t)] = t
        mask[row, : len(t)] = 1
    return out, mask


def encode(tokenizer, examples: Examples, max_length: int) -> Encoded:
    """Tokenize a split once (truncated to ``max_length`` tokens, padded later per batch)."""
    enc = tokenizer(
        examples.text_a, examples.text_b, truncation=True, max_length=max_length, padding=False
    )
    ids = [torch.tensor(x, dtype=torch.long) for x in enc["input_ids"]]
    types = enc.get("token_type_ids")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(
        input_ids=ids,
        token_type_ids=None if types is None else [torch.tensor(t, dtype=torch.long) for t in types],
        labels=torch.tensor(examples.labels, dtype=torch.long),
        pad_id=pad_id,
    )
