"""Hugging Face ``datasets``: a task by its dataset name (``--task hf:NAME[:CONFIG]``), where a hub is
reachable, or a local dataset folder (``--task hf:/path/to/folder``).

Needs the optional extra: ``pip install -e ".[hub]"`` from the checkout.
"""

from __future__ import annotations

from hlora.data.examples import DataError, Examples, TaskData

DEV_SPLITS = ("validation", "dev", "test")


def load_hub_task(spec: str, text_columns: list[str] | None, label_column: str | None) -> TaskData:
    """``spec`` is ``NAME`` or ``NAME:CONFIG`` (e.g. ``glue:sst2``); splits train and validation."""
    try:
        import datasets
    except ImportError:
        raise DataError("--task hf:... needs the datasets package: pip install -e '.[hub]' (in the hlora checkout)") from None
    if not text_columns or not label_column:
        raise DataError("--task hf:... needs --text-columns and --label-column")
    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None)
    except Exception as e:  # offline, unknown name, bad config: one line, no traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load dataset {spec!r}: {first}") from None
    if "train" not in ds:
        raise DataError(f"dataset {spec!r} has no train split (splits: {', '.join(ds)})")
    dev_split = next((s for s in DEV_SPLITS if s in ds), None)
    if dev_split is None:
        raise DataError(f"dataset {spec!r} has no validation split (splits: {', '.join(ds)})")
    train, dev = ds["train"], ds[dev_split]
    missing = [c for c in text_columns + [label_column] if c not in train.column_names]
    if missing:
        raise DataError(f"dataset {spec!r} has no column {', '.join(map(repr, missing))} "
                        f"(columns: {', '.join(train.column_names)})")
    feature = train.features[label_column]
    names = getattr(feature, "names", None)
    if names is None:  # plain values: the sorted set of the training labels
        values = sorted(set(train[label_column]))
        names = [str(v) for v in values]
        index = {v: i for i, v in enumerate(values)}
    else:
        index = {i: i for i in range(len(names))}

    def build(split, which: str) -> Examples:
        labels = []
        for row, value in enumerate(split[label_column]):
            if value not in index:
                raise DataError(f"dataset {spec!r}, {which} row {row}: unknown label {value!r}")
            labels.append(index[value])
        a = [str(x) for x in split[text_columns[0]]]
        b = [str(x) for x in split[text_columns[1]]] if len(text_columns) == 2 else None
        return Examples(a, b, labels)

    f1 = 1 if len(names) == 2 else None
    return TaskData(f"hf:{spec}", build(train, "train"), build(dev, dev_split), list(names), f1,
                    list(text_columns), label_column)
