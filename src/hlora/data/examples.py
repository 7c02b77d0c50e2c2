"""Labelled text examples, and their tokenized form (tokenized once per run)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

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
    """A task's train and dev splits and what its labels mean."""

    name: str
    train: Examples
    dev: Examples
    label_names: list[str]
    #: the label whose F1 is reported (the positive class), or None
    f1_label: int | None = None
    #: the file columns the examples were read from
    text_columns: list[str] | None = None
    label_column: str | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass
class Encoded:
    """Token ids per example (unpadded) and labels; ``batch`` pads a selection."""

    input_ids: list[Tensor]
    token_type_ids: list[Tensor] | None
    labels: Tensor
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @cached_property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.input_ids]

    def batch(self, indices: list[int] | Tensor) -> dict[str, Tensor]:
        idx = [int(i) for i in indices]
        ids = [self.input_ids[i] for i in idx]
        n, width = len(ids), max(len(t) for t in ids)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for row, t in enumerate(ids):
            input_ids[row, : len(t)] = t
            mask[row, : len(t)] = 1
        out = {"input_ids": input_ids, "attention_mask": mask, "labels": self.labels[idx]}
        if self.token_type_ids is not None:
            types = torch.zeros((n, width), dtype=torch.long)
            for row, i in enumerate(idx):
                t = self.token_type_ids[i]
                types[row, : len(t)] = t
            out["token_type_ids"] = types
        return out


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
