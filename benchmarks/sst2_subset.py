"""A seeded subset of GLUE SST-2 as TSV files, for the small skewed federation of the learning issue.

    python benchmarks/sst2_subset.py OUT_DIR [--train 2000] [--seed 0] [--glue ../shared/data/glue]

Writes OUT_DIR/train.tsv (``--train`` examples drawn without replacement from SST-2 train with
numpy's default_rng(seed)) and OUT_DIR/dev.tsv (the whole 872-example dev set). Run on them with
``--train OUT_DIR/train.tsv --dev OUT_DIR/dev.tsv --text-columns sentence --label-column label``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--glue", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/glue")
    args = ap.parse_args()
    src = args.glue / "SST-2"
    lines = (src / "train.tsv").read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], lines[1:]
    pick = sorted(np.random.default_rng(args.seed).choice(len(rows), args.train, replace=False).tolist())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.tsv").write_text("\n".join([header] + [rows[i] for i in pick]) + "\n", encoding="utf-8")
    (args.out / "dev.tsv").write_text((src / "dev.tsv").read_text(encoding="utf-8"), encoding="utf-8")
    print(f"{args.out}: {args.train} train examples (seed {args.seed}), {len((src / 'dev.tsv').read_text().splitlines()) - 1} dev")


if __name__ == "__main__":
    main()
