"""Data: load a task's splits, tokenize them once, and partition the training set across clients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hlora.data.examples import DataError, Encoded, Examples, TaskData, encode
from hlora.data.files import read_column, read_rows
from hlora.data.glue import GLUE
from hlora.data.instruct import EncodedLM, Fields, InstructExamples, encode_instruct, read_instruct
from hlora.data.partition import METHODS as PARTITIONS
from hlora.data.partition import PartitionError, partition

__all__ = [
    "DataError",
    "Encoded",
    "Examples",
    "EncodedLM",
    "Fields",
    "InstructExamples",
    "encode_instruct",
    "TaskData",
    "encode",
    "load_task",
    "read_split",
    "partition",
    "PartitionError",
    "PARTITIONS",
    "read_column",
    "TASKS",
    "TRAIN_SUBSET_SEED",
    "subset_train",
    "task_of",
]

TASKS = sorted(GLUE)
INSTRUCT = "instruct"
#: the seed of ``--train-subset``'s draw: one fixed subset for every ``--seed``, so seeds vary the federation
#: (split, ranks, client sample), not the data
TRAIN_SUBSET_SEED = 0


def task_of(cfg: Any) -> TaskData:
    """The task a run config names (task, files, columns, instruction fields), with its ``train_subset``."""
    task = load_task(cfg.task, cfg.train, cfg.dev, cfg.text_columns, cfg.label_column, Fields.of(cfg))
    return subset_train(task, cfg.train_subset)


def subset_train(task: TaskData, n: int | None) -> TaskData:
    """Keep ``n`` training examples (None: all): a uniform draw without replacement with
    :data:`TRAIN_SUBSET_SEED`, kept in file order. The dev split is untouched."""
    if n is None:
        return task
    if not 1 <= n <= len(task.train):
        raise DataError(f"--train-subset {n}: the training set of {task.name} has {len(task.train)} examples")
    keep = np.sort(np.random.default_rng(TRAIN_SUBSET_SEED).choice(len(task.train), size=n, replace=False))
    task.train = task.train.subset(keep.tolist())
    return task


def load_task(
    task: str | None,
    train: str | Path | None = None,
    dev: str | Path | None = None,
    text_columns: list[str] | None = None,
    label_column: str | None = None,
    fields: Fields | None = None,
) -> TaskData:
    """A GLUE task by name (``mrpc``, ``rte``, ``sst2``), or local files given by ``train`` and ``dev``.

    Files need ``text_columns`` (one, or two for a sentence pair) and ``label_column``; labels may be
    strings or integers. The label set is taken from the training file, sorted. ``hf:NAME[:CONFIG]``
    loads a Hugging Face dataset (train and validation splits), with the same column options.
    ``instruct``: instruction JSONL files (``train``, ``dev``) for a decoder LM, fields per ``fields``.
    """
    if task == INSTRUCT:
        if train is None or dev is None:
            raise DataError("--task instruct needs --train and --dev JSONL files")
        train_ex, categories = read_instruct(train, fields or Fields())
        dev_ex, _ = read_instruct(dev, fields or Fields())  # its categories do not matter
        return TaskData(INSTRUCT, train_ex, dev_ex, categories, kind=INSTRUCT, train_file=str(train))
    if train is not None or dev is not None:
        if train is None or dev is None:
            raise DataError("--train and --dev go together: give both files")
        if not text_columns or not label_column:
            raise DataError("local files need --text-columns and --label-column")
        if len(text_columns) > 2:
            raise DataError("--text-columns takes one column, or two for a sentence pair")
        return _from_files(task or Path(train).stem, train, dev, text_columns, label_column, None, None)
    if task is not None and task.startswith("hf:"):
        from hlora.data.hub import load_hub_task

        return load_hub_task(task[3:], text_columns, label_column)
    if task is None or task.lower() not in GLUE:
        raise DataError(
            f"unknown task {task!r}; choose one of: {', '.join(TASKS)}, instruct, hf:NAME[:CONFIG], "
            "or give --train/--dev files"
        )
    g = GLUE[task.lower()]
    return _from_files(
        task.lower(), g.path("train"), g.path("dev"), list(g.text_columns), g.label_column,
        list(g.label_names), g.f1_label,
    )


def _from_files(name, train, dev, text_columns, label_column, label_names, f1_label) -> TaskData:
    train_rows = read_rows(train, text_columns, label_column)
    dev_rows = read_rows(dev, text_columns, label_column)
    if label_names is None:
        found = {label for _, (_, label) in train_rows}
        numeric = all(_is_int(x) for x in found)
        label_names = sorted(found, key=int if numeric else str)
        if numeric and set(found) == {"0", "1"}:
            f1_label = "1"
    if len(label_names) < 2:
        raise DataError(f"{train}: a classifier needs at least two labels, found {label_names}")
    index = {name: i for i, name in enumerate(label_names)}
    return TaskData(
        name=name,
        train=_examples(train, train_rows, index, len(text_columns) == 2),
        dev=_examples(dev, dev_rows, index, len(text_columns) == 2),
        label_names=list(label_names),
        f1_label=None if f1_label is None else index[f1_label],
        text_columns=list(text_columns),
        label_column=label_column,
        train_file=str(train),
    )


def _examples(path, rows, index: dict[str, int], pair: bool) -> Examples:
    labels = []
    for line, (_, label) in rows:
        if label not in index:
            raise DataError(f"{path} line {line}: unknown label {label!r} (labels: {', '.join(index)})")
        labels.append(index[label])
    a = [texts[0] for _, (texts, _) in rows]
    b = [texts[1] for _, (texts, _) in rows] if pair else None
    return Examples(a, b, labels)


def read_split(path: str | Path, task: TaskData) -> Examples:
    """Another labelled file with the task's columns and labels (e.g. a second evaluation set)."""
    rows = read_rows(path, task.text_columns, task.label_column)
    return _examples(path, rows, {n: i for i, n in enumerate(task.label_names)}, len(task.text_columns) == 2)


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False
