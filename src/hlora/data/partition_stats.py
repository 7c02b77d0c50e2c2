"""What a split gives each client: its size and label mix, as a table and as ``partition.png``."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def label_counts_per_client(labels: list[int], parts: list[list[int]], num_labels: int) -> np.ndarray:
    """Clients x labels: how many examples of each label each client holds."""
    y = np.asarray(labels)
    return np.stack([np.bincount(y[p], minlength=num_labels) for p in parts]) if parts else np.zeros((0, num_labels))


def format_table(counts: np.ndarray, label_names: list[str]) -> str:
    """A compact table: one row per client (its size, its examples of each label, how many labels it holds),
    then a summary line."""
    names = [str(n) for n in label_names]
    widths = [max(len(n), len(str(int(counts[:, j].max(initial=0))))) for j, n in enumerate(names)]
    size_w = max(4, len(str(int(counts.sum(1).max(initial=0)))))
    client_w = max(6, len(str(len(counts) - 1)))
    head = f"{'client':>{client_w}}  {'size':>{size_w}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths))
    lines = [head + "  labels"]
    for i, row in enumerate(counts):
        cells = "  ".join(f"{int(c):>{w}}" for c, w in zip(row, widths))
        lines.append(f"{i:>{client_w}}  {int(row.sum()):>{size_w}}  {cells}  {int((row > 0).sum()):>6}")
    sizes = counts.sum(1)
    held = (counts > 0).sum(1)
    lines.append(
        f"{len(counts)} clients, {int(sizes.sum())} examples; size min {int(sizes.min())}, median "
        f"{float(np.median(sizes)):g}, max {int(sizes.max())}; labels per client {held.mean():.2f} on average"
    )
    return "\n".join(lines)


def partition_stats(cfg, folder: Path) -> tuple[str, Path]:
    """Load the config's task (its training split only matters), split it as a run would, and return the
    table and the path of ``folder/partition.png``."""
    from hlora.data import task_of
    from hlora.plots import plot_partition

    task = task_of(cfg)
    parts = cfg.client_parts(task)
    counts = label_counts_per_client(task.train.labels, parts, task.num_labels)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    what = cfg.partition + {"dirichlet": f" (alpha {cfg.alpha:g})",
                            "pathological": f" ({cfg.classes_per_client} labels a client)",
                            "shard": f" ({cfg.shards_per_client} shards a client)",
                            "size": f" (exponent {cfg.size_exponent:g})"}.get(cfg.partition, "")
    title = f"{task.name}: {len(parts)} clients, {what} split, seed {cfg.seed}"
    png = plot_partition(counts, task.label_names, folder / "partition.png", title)
    return format_table(counts, task.label_names), png
