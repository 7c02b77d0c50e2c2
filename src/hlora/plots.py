"""Figures of finished runs: accuracy (eval loss for a language model) against round, and against
cumulative megabytes sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _curves(runs: list[list[dict[str, Any]]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max of ``key`` per round over seeds (cut to the shortest run), and mean cumulative MB."""
    n = min(len(r) for r in runs)
    acc = np.array([[row[key] for row in r[:n]] for r in runs]) * (100 if key == "accuracy" else 1)
    mb = np.array([np.cumsum([(row["uplink_bytes"] + row["downlink_bytes"]) / 1e6 for row in r[:n]]) for r in runs])
    return acc.mean(0), acc.min(0), acc.max(0), mb.mean(0)


def plot_groups(groups: dict[str, list[list[dict[str, Any]]]], out: Path, title: str = "") -> list[Path]:
    """``accuracy.png`` (``eval_loss.png`` for language models) and ``communication.png`` in ``out``: one line
    per group (a band over seeds), each line labelled at its end so that no legend hunt is needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {k: v for k, v in groups.items() if v}
    first = next(iter(groups.values()))[0][0]
    key = "accuracy" if "accuracy" in first else "eval_loss"
    ylabel, what = ("dev accuracy (%)", "accuracy") if key == "accuracy" else ("dev loss (response tokens)", "eval loss")
    colors = plt.get_cmap("tab10")
    paths = []
    for kind in (key, "communication"):
        fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
        for i, (label, runs) in enumerate(groups.items()):
            mean, lo, hi, mb = _curves(runs, key)
            x = np.arange(1, len(mean) + 1) if kind == key else mb
            c = colors(i % 10)
            if kind == "communication" and mb[-1] == 0:  # centralized: no communication, a reference line
                ax.axhline(mean[-1], color=c, ls="--", lw=1)
                ax.annotate(f"{label} (no communication)", (1.0, mean[-1]), xycoords=("axes fraction", "data"),
                            ha="right", va="bottom", color=c, fontsize=8)
                continue
            ax.plot(x, mean, color=c, lw=1.8)
            if len(runs) > 1:
                ax.fill_between(x, lo, hi, color=c, alpha=0.15, lw=0)
            ax.annotate(f" {label}", (x[-1], mean[-1]), color=c, fontsize=8, va="center")
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
        fig.tight_layout()
        path = out / f"{kind}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
