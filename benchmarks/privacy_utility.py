"""Issue #18's privacy-utility table from the committed MRPC grid: accuracy against epsilon, HLoRA and FedIT.

    python benchmarks/privacy_utility.py > docs/results/privacy-utility.md

Reads the cells of docs/results/compare-mrpc-s6 (40 rounds, 100 clients, 20 a round, delta = 1/100^1.1):
for each strategy its run without DP (epsilon inf) and its runs at ``dp_epsilon_target`` 8, 3 and 1. Per row:
the noise multiplier z, the final accuracy per seed and over seeds, the mean of the last 10 rounds, and the
final accuracy's difference from the same strategy without DP on the same seeds, with a 95% paired bootstrap
interval over dev examples (hlora.stats.paired_bootstrap, as the comparison tables).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.grids import MRPC, cell  # noqa: E402 (it puts src on the path)
from hlora.metrics import read_rows  # noqa: E402
from hlora.report import _final_correct  # noqa: E402
from hlora.stats import paired_bootstrap, spread  # noqa: E402
EPSILONS = ("8", "3", "1")
STRATEGIES = {  # name: (its run without DP, the prefix its DP runs add dp_epsilon_target=EPS to)
    "HLoRA 2..8": ("hlora", "hlora:dp_clip=0.75:dp_epsilon_target="),
    "FedIT rank 8 (avgm, lr 2)": (
        "fedit:ranks=8:server_opt=avgm:server_lr=2",
        "fedit:ranks=8:server_opt=avgm:server_lr=2:dp_clip=0.6:dp_epsilon_target=",
    ),
}
SEEDS = (0, 1, 2)
LAST = 10


def correct(path: Path) -> list[int]:
    """Per dev example, 1 if the final round predicted it right (as the comparison tables read it)."""
    scores = _final_correct(path, read_rows(path))
    if scores is None:
        raise SystemExit(f"{path}: no dev predictions of the final round")
    return scores


def row(name: str, eps: str, method: str, plain: str) -> str:
    paths = {s: cell(MRPC, method, s) for s in SEEDS}
    seeds = [s for s, p in paths.items() if p]
    if not seeds:
        return f"| {name} | {eps} | - | not run | | | | | |"
    summaries = {s: json.loads((paths[s] / "summary.json").read_text()) for s in seeds}
    finals = [100 * summaries[s]["final_accuracy"] for s in seeds]
    bests = [100 * summaries[s]["best_accuracy"] for s in seeds]
    tails = [100 * sum(r["accuracy"] for r in read_rows(paths[s])[-LAST:]) / LAST for s in seeds]
    z = summaries[seeds[0]].get("dp_noise")
    per_seed = " / ".join(f"{v:.1f}" for v in finals)
    final, best, tail = spread(finals), spread(bests), spread(tails)
    if method == plain:
        delta = "-"
    else:
        pairs = [(paths[s], cell(MRPC, plain, s)) for s in seeds]
        if not all(ref for _, ref in pairs):
            delta = "no plain run on these seeds"
        else:
            d = paired_bootstrap([correct(p) for p, _ in pairs], [correct(ref) for _, ref in pairs])
            delta = f"{100 * d.estimate:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]" + (
                " ✓" if d.resolved else " ?"
            )
    z_text = f"{z:.3f}" if z else "-"
    return (
        f"| {name} | {eps} | {z_text} | {per_seed} ({','.join(map(str, seeds))}) "
        f"| {final.mean:.1f} ± {final.std:.1f} "
        f"| {best.mean:.1f} ± {best.std:.1f} | {tail.mean:.1f} ± {tail.std:.1f} | {delta} |"
    )


def main() -> None:
    print(
        "| strategy | epsilon | z | final acc per seed (seeds) | final, mean ± std | best, mean ± std "
        "| last 10 rounds, mean ± std | Δ final vs no DP, bootstrap 95% (pts) |"
    )
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | --- |")
    for name, (plain, prefix) in STRATEGIES.items():
        print(row(name, "inf", plain, plain))
        for eps in EPSILONS:
            print(row(name, eps, prefix + eps, plain))
    print()
    print(
        "- MRPC dev (408 examples, majority class 68.4%), 40 rounds, 100 clients, 20 a round, "
        "delta = 1/100^1.1; "
        "cells in results/compare-mrpc-s6/. Clip C: HLoRA 0.75 on s B A's change, "
        "FedIT 0.6 on its factors' change "
        "(docs/privacy.md says how each was chosen)."
    )
    print("- best: the highest dev accuracy of the 40 rounds, per seed, then mean ± std over seeds.")
    print("- last 10 rounds: the mean dev accuracy of rounds 31-40 per seed, then mean ± std over seeds.")
    print(
        "- Δ: final accuracy minus the same strategy's without DP on the same seeds; "
        "the interval resamples dev "
        "examples within each seed (2000 resamples, seeded). ✓: it excludes 0; ?: it does not."
    )
    print("- Written by `python benchmarks/privacy_utility.py` from the committed cells.")


if __name__ == "__main__":
    main()
