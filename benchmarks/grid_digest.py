"""A markdown digest of a `hlora compare` grid, made from its cells' files (nothing is re-run):

    python benchmarks/grid_digest.py GRID_DIR [--cells DEST]

- every cell's accuracy and eval loss per round;
- a second cut of the table: final accuracy, mean accuracy and eval loss over the second half of the run,
  the lowest eval loss and its round;
- for each seed, the label mix of each round's sampled clients (a label's share among their examples, from
  the split the run's checkpoint recorded), against the training set's: a label-skewed split moves
  federated runs with it.

``--cells DEST`` also copies each cell's ``metrics.jsonl``, ``summary.json`` and ``config.yaml`` (a few
KB each) to ``DEST/<method>/seed<k>/``, so that the numbers in the digest can be checked later without the
run directories (the checkpoints and adapters are left behind).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path

from hlora.compare import cell_labels, cell_state, read_rows
from hlora.config import load_config
from hlora.data import load_task


def cells(grid: Path) -> list[tuple[str, Path]]:
    """(method label, cell directory) of every finished cell, in the order of the grid's table."""
    labels = cell_labels(grid)
    if not labels:
        raise SystemExit(f"{grid}: no table.csv (run hlora compare, or hlora compare --report-only, first)")
    found = []
    for slug, label in labels.items():
        for seed_dir in sorted(d for d in (grid / slug).glob("seed*") if d.is_dir()):  # not seed<k>.lock
            if cell_state(seed_dir) == "done":
                found.append((f"{label} {seed_dir.name}", seed_dir))
    return found


def label_mix(cell: Path) -> tuple[list[str], list[float], list[list[float]]]:
    """Label names, each label's share of the training set, and its share among each round's sampled
    clients' examples (the clients' shares of the data as the run's checkpoint recorded them)."""
    from hlora.checkpoint import load_checkpoint

    cfg = load_config(cell / "config.yaml", {"out": str(cell)})
    task = load_task(cfg.task, cfg.train, cfg.dev, cfg.text_columns, cfg.label_column)
    labels = task.train.labels
    parts = load_checkpoint(cell)[1]["partition"]
    names = list(task.label_names)
    overall = [labels.count(c) / len(labels) for c in range(len(names))]
    per_round = []
    for row in read_rows(cell):
        ys = [labels[i] for k in row["clients"] for i in parts[k]]
        per_round.append([ys.count(c) / len(ys) for c in range(len(names))])
    return names, overall, per_round


def digest(grid: Path) -> str:
    found = cells(grid)
    lines = [f"Digest of the grid `{grid}` (`python benchmarks/grid_digest.py {grid}`).", ""]
    lines += ["Accuracy (%) and eval loss per round, from each cell's `metrics.jsonl`:", ""]
    rows_of = {cell: read_rows(cell) for _, cell in found}
    for name, cell in found:
        rows = rows_of[cell]
        per_round = statistics.fmean(r["seconds"] for r in rows)
        lines.append(f"- `{name}` ({len(rows)} rounds, {per_round:.0f} s/round):")
        lines.append("  accuracy: " + " ".join(f"{100 * r['accuracy']:.1f}" for r in rows))
        lines.append("  eval loss: " + " ".join(f"{r['eval_loss']:.3f}" for r in rows))
    lines += ["", "| cell | final acc | mean acc, 2nd half | final eval loss | mean eval loss, 2nd half "
              "| min eval loss (round) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, cell in found:
        rows = rows_of[cell]
        half = rows[len(rows) // 2:]
        low = min(rows, key=lambda r: r["eval_loss"])
        lines.append(
            f"| {name} | {100 * rows[-1]['accuracy']:.1f} | {100 * statistics.fmean(r['accuracy'] for r in half):.1f}"
            f" | {rows[-1]['eval_loss']:.3f} | {statistics.fmean(r['eval_loss'] for r in half):.3f}"
            f" | {low['eval_loss']:.3f} ({low['round']}) |"
        )
    first_of_seed: dict[str, tuple[str, Path]] = {}  # every method of a seed samples the same clients
    for name, cell in found:
        first_of_seed.setdefault(cell.name, (name, cell))
    for seed, (name, cell) in sorted(first_of_seed.items()):
        names, overall, per_round = label_mix(cell)
        lines += ["", f"Share of label `{names[-1]}` among the examples of each round's sampled clients, {seed} "
                  f"(from `{name}`; {overall[-1]:.2f} in the whole training set):",
                  " ".join(f"{mix[-1]:.2f}" for mix in per_round)]
    return "\n".join(lines) + "\n"


def copy_cells(grid: Path, dest: Path) -> None:
    for _, cell in cells(grid):
        target = dest / cell.parent.name / cell.name
        target.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "summary.json", "config.yaml"):
            shutil.copy2(cell / name, target / name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("grid", type=Path)
    p.add_argument("--cells", type=Path, help="copy each cell's metrics, summary and config here")
    args = p.parse_args()
    print(digest(args.grid), end="")
    if args.cells:
        copy_cells(args.grid, args.cells)


if __name__ == "__main__":
    main()
