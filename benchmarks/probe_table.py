"""A markdown table of short runs (probes): one row per run directory, its settings that differ from
the papers' training (`hlora run --preset paper`), and eval loss and accuracy per round.

    python benchmarks/probe_table.py RUN_DIR [RUN_DIR ...] [--copy DEST]

``--copy DEST`` also copies each run's metrics.jsonl and config.yaml to DEST/<run name>/.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import fields
from pathlib import Path

import yaml

from hlora.config import RunConfig, load_config

SKIP = {"out", "client_ranks", "client_layer_ranks", "threads", "rounds", "precision", "preset", "train", "dev", "text_columns",
        "label_column"}


def differs(cfg: dict) -> str:
    base = load_config(None, {"preset": "paper"})
    out = []
    for f in fields(RunConfig):
        if f.name in SKIP or f.name not in cfg:
            continue
        if cfg[f.name] != getattr(base, f.name):
            out.append(f"{f.name}={cfg[f.name]}")
    return ", ".join(out) or "(the papers' training)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--copy", type=Path)
    args = ap.parse_args()
    print("| run | settings | eval loss per round | accuracy per round (%) |")
    print("| --- | --- | --- | --- |")
    for run in args.runs:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        loss = " ".join(f"{r['eval_loss']:.3f}" for r in rows if "eval_loss" in r)
        acc = " ".join(f"{100 * r['accuracy']:.1f}" for r in rows if "accuracy" in r)
        print(f"| {run.name} | {differs(cfg)} | {loss} | {acc} |")
        if args.copy:
            dest = args.copy / run.name
            dest.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.jsonl", "config.yaml", "summary.json"):
                if (run / name).exists():
                    shutil.copy(run / name, dest / name)


if __name__ == "__main__":
    main()
