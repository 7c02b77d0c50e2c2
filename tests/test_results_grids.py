"""benchmarks/grids.py, the results grids' definitions, against the cells committed under docs/results."""

from pathlib import Path

from benchmarks.grids import GRIDS, ROOT, committed, missing
from hlora.compare import parse_methods


def committed_slugs(docs: Path) -> set[str]:
    return {p.parent.parent.name for p in docs.glob("*/seed*/summary.json")}


def test_every_committed_cell_belongs_to_its_grid_and_every_extra_table_to_the_grid():
    # a cell committed without its method in grids.py would be left out of the regenerated tables
    for name, grid in GRIDS.items():
        slugs = {parse_methods(m)[0].slug: m for m in grid.methods}
        assert len(slugs) == len(grid.methods), f"{name}: two methods share a directory"
        assert committed_slugs(ROOT / grid.docs) <= set(slugs), name
        assert grid.probes <= set(grid.methods), name
        for table in grid.tables:
            assert table.reference in table.methods and set(table.methods) <= set(grid.methods), (
                name,
                table.name,
            )


def test_missing_lists_exactly_the_uncommitted_cells_as_queue_lines(tmp_path):
    for name, grid in GRIDS.items():
        lines = missing(grid, str(tmp_path))
        listed = {}
        for line in lines:
            task, out, rounds, method, seeds = line.split(" ")
            assert (task, out, rounds) == (grid.task, f"{tmp_path}/{Path(grid.docs).name}", str(grid.rounds))
            listed[method] = {int(s) for s in seeds.split(",")}
        for method in grid.methods:
            want = {s for s in grid.seeds(method) if not committed(grid, method, s)}
            assert listed.get(method, set()) == want, (name, method)
