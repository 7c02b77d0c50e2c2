"""Read labelled examples from local TSV, CSV or JSONL files, saying which line is wrong."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from hlora.data.examples import DataError

Row = tuple[list[str], str]  # (texts, label) with the file's line number kept by the caller


def read_rows(path: str | Path, text_columns: list[str], label_column: str) -> list[tuple[int, Row]]:
    """Rows of (line number, (texts, label string)) from a .tsv, .csv, .json or .jsonl file.

    TSVs are read as GLUE writes them: tab-separated, no quoting (a field may begin with a bare
    quote), a header row, and an optional UTF-8 byte-order mark.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        return _read_jsonl(path, text_columns, label_column)
    rows = [(line, (values[:-1], values[-1].strip())) for line, values in
            _read_table(path, text_columns + [label_column])]
    if not rows:
        raise DataError(f"{path}: no examples after the header")
    return rows


def read_column(path: str | Path, column: str) -> list[str]:
    """The values of one column (or JSONL field) for the rows :func:`read_rows` keeps, in the same order."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        out = []
        for line, obj in read_json_objects(path):
            if column not in obj:
                raise DataError(f"{path} line {line}: no field {column!r}")
            out.append(str(obj[column]).strip())
        return out
    return [values[0].strip() for _, values in _read_table(path, [column])]


def _read_table(path: Path, wanted: list[str]) -> list[tuple[int, list[str]]]:
    """(line number, the ``wanted`` columns' values) for each non-blank row of a .tsv, .csv or .txt file."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".csv", ".txt"):
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .tsv, .csv or .jsonl)")
    delimiter, quoting = ("\t", csv.QUOTE_NONE) if suffix != ".csv" else (",", csv.QUOTE_MINIMAL)
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: the file is empty (a header row is expected)")
        missing = [c for c in wanted if c not in header]
        if missing:
            raise DataError(
                f"{path}: no column {', '.join(map(repr, missing))} in the header "
                f"(columns: {', '.join(header)})"
            )
        pos = [header.index(c) for c in wanted]
        rows = []
        for row in reader:
            line = reader.line_num
            if not row or row == [""]:
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path} line {line}: expected {len(header)} fields, found {len(row)}"
                )
            rows.append((line, [row[p] for p in pos]))
    return rows


def read_json_objects(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; a bad line is named."""
    rows = []
    with path.open(encoding="utf-8-sig") as fh:
        for line, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {line}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path} line {line}: expected a JSON object")
            rows.append((line, obj))
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def _read_jsonl(path: Path, text_columns: list[str], label_column: str) -> list[tuple[int, Row]]:
    rows = []
    for line, obj in read_json_objects(path):
        missing = [c for c in text_columns + [label_column] if c not in obj]
        if missing:
            raise DataError(f"{path} line {line}: no field {', '.join(map(repr, missing))}")
        rows.append((line, ([str(obj[c]) for c in text_columns], str(obj[label_column]).strip())))
    return rows
