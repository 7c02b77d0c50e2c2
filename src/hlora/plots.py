"""Figures of finished runs: accuracy (eval loss for a language model) against round, and against
cumulative megabytes sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hlora.metrics import score_key


def _curves(
    runs: list[list[dict[str, Any]]], key: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max of ``key`` over seeds at each evaluated round (cut to the shortest run), the mean
    cumulative MB at those rounds, and the rounds."""
    n = min(len(r) for r in runs)
    mb = np.array([np.cumsum([(row["uplink_bytes"] + row["downlink_bytes"]) / 1e6 for row in r[:n]]) for r in runs])
    at = [i for i, row in enumerate(runs[0][:n]) if all(key in r[i] for r in runs)]  # evaluated in every run
    acc = np.array([[r[i][key] for i in at] for r in runs]) * (100 if key == "accuracy" else 1)
    rounds = np.array([runs[0][i]["round"] for i in at])
    return acc.mean(0), acc.min(0), acc.max(0), mb[:, at].mean(0), rounds


def spread_labels(ys: list[float], gap: float) -> list[float]:
    """Positions for labels wanted at heights ``ys`` such that any two are at least ``gap`` apart and the
    total squared displacement is least: sorted, overlapping labels merge into a block of spacing ``gap``
    centred on their wanted heights (the block's mean)."""
    blocks: list[tuple[list[int], float]] = []  # (indices bottom to top, height of the bottom one)
    for i in sorted(range(len(ys)), key=ys.__getitem__):
        blocks.append(([i], ys[i]))
        while len(blocks) > 1 and blocks[-2][1] + len(blocks[-2][0]) * gap > blocks[-1][1]:
            idx = blocks[-2][0] + blocks[-1][0]
            blocks[-2:] = [(idx, sum(ys[j] - k * gap for k, j in enumerate(idx)) / len(idx))]
    out = [0.0] * len(ys)
    for idx, bottom in blocks:
        for k, j in enumerate(idx):
            out[j] = bottom + k * gap
    return out


def _label_ends(ax: Any, ends: list[tuple[str, float, float, Any]], log_x: bool) -> None:
    """Write each line's label right of its end, moving labels of ends that are close in x apart vertically
    (a thin leader line joins a moved label to its end)."""
    lo, hi = ax.get_ylim()
    gap = 0.04 * (hi - lo)
    xs = [np.log10(x) if log_x else x for _, x, _, _ in ends]
    left, right = (np.log10(v) if log_x else v for v in ax.get_xlim())
    near = 0.15 * (right - left)  # ends closer than this in x can collide
    order = sorted(range(len(ends)), key=xs.__getitem__)
    clusters: list[list[int]] = []
    for i in order:
        if clusters and xs[i] - xs[clusters[-1][-1]] < near:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    for members in clusters:
        for i, y in zip(members, spread_labels([ends[i][2] for i in members], gap)):
            label, x, y0, color = ends[i]
            dx = 0.03 * (right - left) if abs(y - y0) > 1e-9 else 0.01 * (right - left)
            tx = 10 ** (xs[i] + dx) if log_x else x + dx
            leader = {"arrowstyle": "-", "color": color, "lw": 0.5, "relpos": (0, 0.5), "shrinkA": 1, "shrinkB": 0}
            ax.annotate(label, (x, y0), xytext=(tx, y), color=color, fontsize=8, va="center",
                        arrowprops=leader if abs(y - y0) > 1e-9 else None)


def plot_groups(
    groups: dict[str, list[list[dict[str, Any]]]],
    out: Path,
    title: str = "",
    reference: tuple[str, float] | None = None,
    prefix: str = "",
) -> list[Path]:
    """``accuracy.png`` (``eval_loss.png`` for language models) and ``communication.png`` in ``out``, each
    name after ``prefix``: one line per group (a band over seeds), each line labelled at its end so that no
    legend hunt is needed.

    ``reference`` = (name, accuracy in [0, 1]) draws a labelled dotted line on the accuracy figures, e.g. the
    majority class of the dev set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {k: [rows for rows in v if rows] for k, v in groups.items()}
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        return []
    key = score_key(next(iter(groups.values()))[0])
    ylabel, what = ("dev accuracy (%)", "accuracy") if key == "accuracy" else ("dev loss (response tokens)", "eval loss")
    colors = plt.get_cmap("tab10")
    paths = []
    for kind in (key, "communication"):
        fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
        ends: list[tuple[str, float, float, Any]] = []
        for i, (label, runs) in enumerate(groups.items()):
            mean, lo, hi, mb, rounds = _curves(runs, key)
            x = rounds if kind == key else mb
            c = colors(i % 10)
            if kind == "communication" and mb[-1] == 0:  # centralized: no communication, a reference line
                ax.axhline(mean[-1], color=c, ls="--", lw=1)
                ax.annotate(f"{label} (no communication)", (1.0, mean[-1]), xycoords=("axes fraction", "data"),
                            ha="right", va="bottom", color=c, fontsize=8)
                continue
            ax.plot(x, mean, color=c, lw=1.8)
            if len(runs) > 1:
                ax.fill_between(x, lo, hi, color=c, alpha=0.15, lw=0)
            ends.append((label, float(x[-1]), float(mean[-1]), c))
        if reference is not None and key == "accuracy":
            name, value = reference
            ax.axhline(100 * value, color="0.45", ls=":", lw=1)
            ax.annotate(f"{name} ({100 * value:.1f}%)", (0.0, 100 * value), xycoords=("axes fraction", "data"),
                        xytext=(4, 2), textcoords="offset points", va="bottom", color="0.35", fontsize=8,
                        bbox={"fc": "white", "ec": "none", "alpha": 0.85, "pad": 1}, zorder=5)
        ax.set_ylabel(ylabel)
        if kind == key:
            ax.set_xlabel("round")
        else:
            ax.set_xlabel("cumulative MB sent (up + down)")
            ax.set_xscale("log")
        band = " (line: mean over seeds, band: min-max)" if any(len(v) > 1 for v in groups.values()) else ""
        ax.set_title((title + " - " if title else "") + f"{what} vs {'round' if kind == key else 'MB'}{band}",
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.margins(x=0.02)
        left, right = ax.get_xlim()  # room for the end labels
        ax.set_xlim(left, right * 4 if kind == "communication" else right + (right - left) * 0.22)
        _label_ends(ax, ends, log_x=kind == "communication")
        fig.tight_layout()
        path = out / f"{prefix}{kind}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_partition(counts: np.ndarray, label_names: list[str], path: Path, title: str = "") -> Path:
    """``partition.png``: one stacked bar per client (its examples of each label), clients sorted by size,
    largest first. ``counts`` is clients x labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = counts.sum(1)
    order = np.argsort(-sizes, kind="stable")
    n = len(order)
    colors = plt.get_cmap("tab10" if len(label_names) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(min(14.0, 4.0 + 0.12 * n), 4.5), dpi=120)
    x = np.arange(n)
    bottom = np.zeros(n)
    for j, name in enumerate(label_names):
        ax.bar(x, counts[order, j], bottom=bottom, width=0.85 if n < 60 else 1.0, color=colors(j % colors.N),
               label=str(name), lw=0)
        bottom += counts[order, j]
    if n <= 40:
        ax.set_xticks(x, [str(int(c)) for c in order], fontsize=7)
        ax.set_xlabel("client (sorted by size)")
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{n} clients, sorted by size")
    ax.set_ylabel("training examples")
    ax.set_title(title or f"{n} clients, {int(sizes.sum())} examples: label mix per client", fontsize=10)
    ax.legend(title="label", fontsize=8, title_fontsize=8, ncol=max(1, len(label_names) // 20), frameon=False,
              loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.margins(x=0.01)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
