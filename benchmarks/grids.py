"""The committed results grids in one place: which methods and seeds each holds, how its tables are made.

Two commands, both from the repository root:

    python benchmarks/grids.py report [GRID ...]    # regenerate the grids' tables from the committed cells
    python benchmarks/grids.py missing [GRID ...]   # the cells not committed yet, as grid_queue.sh lines

GRID is mrpc, sst2 or robust (default: all). ``missing --exp DIR`` names the scratch directory the queue
lines write into (default /work/exp); the committed cells live under docs/results/ and
benchmarks/commit_cells.sh copies them there as they finish. The lists here are the grids' row order: a
method added to a grid is appended to its ``methods``, so that the tables regenerate in the same order.

The cells ran on fixed code, checked out beside the repository (the machine is new each session):

    git worktree add --detach /work/grid-code 5c5994a     # MRPC and robustness cells
    git worktree add --detach /work/grid-code2 235a9b3    # SST-2 cells
    export HLORA_SRC_MRPC=/work/grid-code/src HLORA_SRC_SST2=/work/grid-code2/src
    python benchmarks/grids.py missing mrpc > /work/exp/qA   # split between two queues, then per queue:
    setsid bash benchmarks/grid_queue.sh /work/exp/qA > /work/exp/qA.out 2>&1 < /dev/null &
    setsid bash benchmarks/commit_cells.sh /work/exp/compare-mrpc-s6 docs/results/compare-mrpc-s6 \
      > /dev/null 2>&1 &
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from hlora.compare import parse_methods  # noqa: E402

ALL_SEEDS = (0, 1, 2)
DP_FEDIT = "fedit:ranks=8:server_opt=avgm:server_lr=2:dp_clip=0.6:dp_epsilon_target="


@dataclass
class Table:
    """A second table of some of a grid's methods (``hlora compare --table NAME``)."""

    name: str
    reference: str
    methods: list[str]
    seeds: tuple[int, ...] = ALL_SEEDS


@dataclass
class Grid:
    docs: str  # committed cells and tables, relative to the repository
    task: str  # grid_queue.sh's TASK: mrpc, or sst2 (--train-subset 6000 --target 0.8)
    rounds: int
    methods: list[str]  # the grid's table, in row order
    probes: set[str] = field(default_factory=set)  # methods run on seed 0 only
    tables: list[Table] = field(default_factory=list)

    def seeds(self, method: str) -> tuple[int, ...]:
        return (0,) if method in self.probes else ALL_SEEDS

    def compare_args(self) -> list[str]:
        task = ["--task", "sst2", "--train-subset", "6000"] if self.task == "sst2" else ["--task", self.task]
        return [*task, "--rounds", str(self.rounds), "--out", self.docs]


MRPC = Grid(
    docs="docs/results/compare-mrpc-s6",
    task="mrpc",
    rounds=40,
    methods=[
        "centralized",
        "hlora",
        "hlora:ranks=8",
        "fedit:ranks=8",
        "fedit:ranks=8:server_opt=avgm:server_lr=2",
        "hlora:server_opt=avg",
        "hlora:logit_adjust=0",
        "hlora:prox_mu=0.01",
        "hlora:local_steps=10",
        "hlora:server_lr=3",
        "hlora:preset=paper",
        "centralized:preset=paper",
        "hlora:ranks=8:preset=paper",
        "fedit:ranks=8:preset=paper",
        "hlora:dp_clip=0.75:dp_noise=0",
        "hlora:dp_clip=0.75:dp_epsilon_target=8",
        "hlora:dp_clip=0.75:dp_epsilon_target=8:server_opt=avg",
        "hlora:dp_clip=0.75:dp_epsilon_target=3",
        "hlora:dp_clip=0.75:dp_epsilon_target=1",
        "flexlora",
        "hetlora",
        "fedplora",
        "flora",
        "ffa",
        "fedex",
        "rolora",
        "lorafair",
        "fedsa",
        "hlora:personal_eval=true",
        "ffa:server_opt=avgm:server_lr=2",
        DP_FEDIT + "8",
        "flexlora:server_opt=avg",
        DP_FEDIT + "3",
        DP_FEDIT + "1",
        "ffa:lora_alpha=64",
    ],
    probes={
        "hlora:local_steps=10",
        "hlora:server_lr=3",
        "hlora:dp_clip=0.75:dp_noise=0",
        "hlora:dp_clip=0.75:dp_epsilon_target=8:server_opt=avg",
        "ffa:server_opt=avgm:server_lr=2",
        "ffa:lora_alpha=64",
    },
    tables=[
        Table(
            "same-step",
            "hlora:server_opt=avg",
            [
                "hlora:server_opt=avg",
                "flexlora:server_opt=avg",
                "fedit:ranks=8",
                "fedex",
                "lorafair",
                "rolora",
                "ffa",
                "fedsa",
                "hetlora",
                "fedplora",
                "flora",
            ],
        ),
        Table(
            "ffa-alpha",
            "ffa",
            ["ffa", "ffa:lora_alpha=64", "ffa:server_opt=avgm:server_lr=2", "hlora:server_opt=avg"],
            seeds=(0,),
        ),
    ],
)

SST2 = Grid(
    docs="docs/results/compare-sst2",
    task="sst2",
    rounds=40,
    methods=[
        "centralized",
        "hlora",
        "hlora:ranks=8",
        "fedit:ranks=8",
        "flexlora",
        "fedplora",
        "hetlora",
        "flora",
        "ffa",
        "fedex",
        "rolora",
        "lorafair",
        "fedsa",
    ],
    tables=[Table("vs-fedit", "fedit:ranks=8", ["fedit:ranks=8", "hlora:ranks=8", "hlora", "centralized"])],
)

SIGNFLIP = "hlora:attack=signflip:attackers="
ROBUST = Grid(
    docs="docs/results/robust-mrpc",
    task="mrpc",
    rounds=20,
    methods=[
        "hlora",
        SIGNFLIP + "0.1",
        SIGNFLIP + "0.1:robust=normclip",
        SIGNFLIP + "0.1:robust=multikrum:robust_f=2",
        SIGNFLIP + "0.2",
        SIGNFLIP + "0.2:robust=normclip",
        SIGNFLIP + "0.2:robust=multikrum:robust_f=4",
        SIGNFLIP + "0.2:robust=trimmed:robust_f=4",
        "hlora:attack=scale:attackers=0.2",
        "hlora:attack=scale:attackers=0.2:robust=normclip",
        "hlora:attack=scale:attackers=0.2:robust=multikrum:robust_f=4",
        SIGNFLIP + "0.1:robust=trimmed:robust_f=2",
        "hlora:attack=noise:attackers=0.2",
        "hlora:attack=scale:attackers=0.2:robust=trimmed:robust_f=4",
        "hlora:attack=scale:attackers=0.1",
        "hlora:attack=scale:attackers=0.1:robust=normclip",
        "hlora:attack=noise:attackers=0.2:robust=multikrum:robust_f=4",
        "hlora:attack=labelflip:attackers=0.2",
        "hlora:attack=labelflip:attackers=0.2:robust=multikrum:robust_f=4",
    ],
)
# the robustness grid's seeds 1-2 are for the clean run and the 20% sign flip with each defense
ROBUST.probes = set(ROBUST.methods) - {
    "hlora",
    SIGNFLIP + "0.2",
    SIGNFLIP + "0.2:robust=normclip",
    SIGNFLIP + "0.2:robust=multikrum:robust_f=4",
    SIGNFLIP + "0.2:robust=trimmed:robust_f=4",
}

GRIDS = {"mrpc": MRPC, "sst2": SST2, "robust": ROBUST}


def cell(grid: Grid, method: str, seed: int) -> Path | None:
    """The committed cell of ``method`` and ``seed`` (None: not committed)."""
    (parsed,) = parse_methods(method)
    path = ROOT / grid.docs / parsed.slug / f"seed{seed}"
    return path if (path / "summary.json").is_file() else None


def committed(grid: Grid, method: str, seed: int) -> bool:
    return cell(grid, method, seed) is not None


def finished_methods(grid: Grid, methods: list[str]) -> list[str]:
    """The methods with at least one committed cell: a table lists only those."""
    return [m for m in methods if any(committed(grid, m, s) for s in grid.seeds(m))]


def report(grid: Grid, hlora: str) -> None:
    base = [hlora, "compare", *grid.compare_args(), "--report-only"]
    runs = [
        [
            "--seeds",
            ",".join(map(str, ALL_SEEDS)),
            "--strategies",
            ",".join(finished_methods(grid, grid.methods)),
        ]
    ]
    for table in grid.tables:
        runs.append(
            [
                "--seeds",
                ",".join(map(str, table.seeds)),
                "--table",
                table.name,
                "--reference",
                table.reference,
                "--strategies",
                ",".join(finished_methods(grid, table.methods)),
            ]
        )
    for extra in runs:
        print("+", " ".join(base[1:] + extra), flush=True)
        subprocess.run(base + extra, cwd=ROOT, check=True)


def missing(grid: Grid, exp: str) -> list[str]:
    """One queue line per method with cells to run (its missing seeds)."""
    out = f"{exp}/{Path(grid.docs).name}"
    lines = []
    for method in grid.methods:
        seeds = [s for s in grid.seeds(method) if not committed(grid, method, s)]
        if seeds:
            lines.append(f"{grid.task} {out} {grid.rounds} {method} {','.join(map(str, seeds))}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["report", "missing"])
    parser.add_argument("grids", nargs="*", metavar="GRID", help="mrpc, sst2 or robust (default: all)")
    parser.add_argument("--exp", default="/work/exp", help="scratch directory of the queue lines (missing)")
    parser.add_argument("--hlora", default=str(ROOT / ".venv/bin/hlora"), help="the hlora command (report)")
    args = parser.parse_args(argv)
    names = args.grids or list(GRIDS)
    unknown = [n for n in names if n not in GRIDS]
    if unknown:
        parser.error(f"unknown grid {unknown[0]!r}: one of {', '.join(GRIDS)}")
    for name in names:
        if args.command == "report":
            report(GRIDS[name], args.hlora)
        else:
            lines = missing(GRIDS[name], args.exp)
            print(f"# {name}: {len(lines)} methods with cells to run")
            print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
