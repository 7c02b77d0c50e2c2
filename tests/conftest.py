"""Shared fixtures: a tiny randomly initialised BERT (saved like a real checkpoint) and tiny data."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from hlora.data.glue import GLUE
from hlora.model import resolve_model_path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT with MiniLM's tokenizer, saved to a folder: loads like any checkpoint."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_mrpc(tmp_path_factory) -> tuple[str, str]:
    """The first 48 training and 24 dev pairs of the bundled MRPC, as TSV files."""
    folder = tmp_path_factory.mktemp("tiny-mrpc")
    out = []
    for split, n in (("train", 48), ("dev", 24)):
        lines = GLUE["mrpc"].path(split).read_text(encoding="utf-8-sig").splitlines()
        target = folder / f"{split}.tsv"
        target.write_text("\n".join(lines[: n + 1]) + "\n", encoding="utf-8")
        out.append(str(target))
    return out[0], out[1]


@pytest.fixture
def tiny_args(tiny_model, tiny_mrpc) -> list[str]:
    """CLI arguments for a fast run on the tiny model and data."""
    return tiny_cli_args(tiny_model, tiny_mrpc)


def tiny_cli_args(tiny_model: str, tiny_mrpc: tuple[str, str]) -> list[str]:
    """The ``tiny_args`` of a model and data (for fixtures of a wider scope)."""
    train, dev = tiny_mrpc
    return [
        "--model", tiny_model, "--train", train, "--dev", dev, "--task", "mrpc",
        "--text-columns", "#1 String,#2 String", "--label-column", "Quality",
        "--clients", "4", "--per-round", "2", "--rounds", "2", "--local-epochs", "1",
        "--batch-size", "8", "--max-length", "48", "--ranks", "2-4", "--precision", "fp32",
    ]
