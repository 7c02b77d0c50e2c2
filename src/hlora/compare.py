"""A grid of runs (methods x seeds) on the same split, client ranks, client sample and seed; then tables.

Each cell is an ordinary run directory ``OUT/<method>/seed<k>``. A cell with a ``summary.json`` is done
and skipped, so an interrupted comparison resumes where it stopped (a half-finished cell continues from
its last checkpoint).
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import statistics
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hlora.config import ConfigError, RunConfig, load_config, parse_options
from hlora.metrics import scored_rows

RUN_FIELDS = {f.name for f in fields(RunConfig)}


@dataclass
class Method:
    """One row of the comparison: a strategy with overrides, e.g. ``hlora:ranks=8``."""

    label: str
    strategy: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label.replace(":", "__").replace("=", "-"))


def _method_items(spec: str) -> list[str]:
    """Split the methods at commas, but keep a rank list whole: ``hlora:ranks=2,4,8,fedit`` -> ``hlora:ranks=2,4,8``
    and ``fedit`` (no strategy is named by a number)."""
    items: list[str] = []
    for part in (x.strip() for x in spec.split(",")):
        if part.isdigit() and items and "=" in items[-1]:
            items[-1] += "," + part
        elif part:
            items.append(part)
    return items


def parse_methods(spec: str) -> list[Method]:
    """``"hlora,hlora:ranks=8,hetlora:norm_weights=true"`` -> methods (run options or strategy options)."""
    methods = []
    for item in _method_items(spec):
        name, *pairs = item.split(":")
        run_opts: dict[str, Any] = {}
        strat_opts = {}
        for key, value in parse_options(pairs).items():
            if key in RUN_FIELDS and key not in ("strategy", "seed", "out", "strategy_options"):
                run_opts[key] = value
            else:
                strat_opts[key] = value
        if strat_opts:
            run_opts["strategy_options"] = strat_opts
        methods.append(Method(item, name.strip(), run_opts))
    if not methods:
        raise ConfigError("--strategies names no method")
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise ConfigError("--strategies names a method twice")
    return methods


def cell_configs(
    config_file: str | Path | None,
    shared: dict[str, Any],
    methods: list[Method],
    seeds: list[int],
    out: Path,
) -> list[tuple[Method, int, RunConfig]]:
    """Every cell's full config, validated before anything runs (a typo, an unknown strategy or option, a
    strategy that refuses the clients' ranks, a cell run before with other settings: each fails at once, not
    hours in)."""
    from hlora.engine.simulation import check_strategy
    from hlora.tasks import is_lm

    cells = []
    for seed in seeds:
        for m in methods:
            overrides = {**shared, **m.overrides, "strategy": m.strategy, "seed": seed,
                         "out": str(out / m.slug / f"seed{seed}")}
            cfg = load_config(config_file, overrides)
            if is_lm(cfg):
                raise ConfigError(
                    "hlora compare tabulates accuracy, and --task instruct runs measure eval loss: run each "
                    "method with hlora run, then draw them together with hlora plot RUN RUN ..."
                )
            try:
                check_strategy(cfg)
            except ValueError as e:
                raise type(e)(f"method {m.label}: {e}") from None
            _check_same_settings(m, cfg)
            cells.append((m, seed, cfg))
    return cells


# Fields a cell may differ in from the grid's settings without being another experiment.
_IGNORED = ("out", "client_ranks", "threads")


def _check_same_settings(method: Method, cfg: RunConfig) -> None:
    """Refuse a cell directory that holds a run made with other settings (it would be skipped or resumed, and
    the table would mix two experiments)."""
    saved_path = Path(cfg.out) / "config.yaml"
    if not saved_path.is_file():
        return
    saved = load_config(saved_path, {"out": cfg.out}).to_dict()
    wanted = cfg.to_dict()
    # an option left to "auto" (--precision, ...) is saved as the cell's own choice: any choice matches it
    diff = [k for k in wanted if k not in _IGNORED and saved.get(k) != wanted[k] and wanted[k] != "auto"]
    if diff:
        what = ", ".join(f"{k} {saved.get(k)!r} (now {wanted[k]!r})" for k in diff)
        raise ConfigError(
            f"{cfg.out} was run with other settings: {what}. Give the same settings to continue this grid, "
            "or another --out for a new one"
        )


def cell_state(path: Path) -> str:
    """``done`` (has summary.json), ``partial`` (started), or ``new``."""
    if (path / "summary.json").exists():
        return "done"
    return "partial" if path.exists() and any(path.iterdir()) else "new"


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cell_labels(out: Path) -> dict[str, str]:
    """Cell folder name -> method label (``hlora__ranks-8`` -> ``hlora:ranks=8``) of a compare directory, read
    from its ``table.csv``; empty when there is none."""
    table = Path(out) / "table.csv"
    if not table.is_file():
        return {}
    with table.open(newline="") as fh:
        return {Method(row["method"], "").slug: row["method"] for row in csv.DictReader(fh)}


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(out: Path, methods: list[Method], seeds: list[int], target: float) -> list[dict[str, Any]]:
    """One row per method: final / best accuracy (and F1) as mean and std over seeds, rounds to the target
    accuracy (mean over the seeds that reach it), total MB up and down (mean over seeds)."""
    table = []
    for m in methods:
        logs = [read_rows(out / m.slug / f"seed{s}") for s in seeds
                if cell_state(out / m.slug / f"seed{s}") == "done"]
        if not logs:
            continue
        runs = [scored_rows(r, "accuracy") for r in logs]  # the evaluated rounds
        row: dict[str, Any] = {"method": m.label, "seeds": len(runs), "rounds": len(logs[0])}
        for key, values in [
            ("final_acc", [r[-1]["accuracy"] for r in runs]),
            ("best_acc", [max(x["accuracy"] for x in r) for r in runs]),
            ("final_f1", [r[-1].get("f1", math.nan) for r in runs]),
        ]:
            row[key], row[key + "_std"] = _mean_std(values)
        reached = [next((x["round"] for x in r if x["accuracy"] >= target), None) for r in runs]
        hit = [x for x in reached if x is not None]
        row["rounds_to_target"] = statistics.fmean(hit) if hit else math.nan
        row["reached_target"] = f"{len(hit)}/{len(runs)}"
        row["mb_up"] = statistics.fmean(sum(x["uplink_bytes"] for x in r) / 1e6 for r in logs)
        row["mb_down"] = statistics.fmean(sum(x["downlink_bytes"] for x in r) / 1e6 for r in logs)
        table.append(row)
    return table


def write_tables(table: list[dict[str, Any]], out: Path, target: float) -> None:
    """``table.csv`` (every number) and ``table.md`` (mean ± std, readable)."""
    if not table:
        return
    with (out / "table.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    has_f1 = any(not math.isnan(r["final_f1"]) for r in table)

    def pm(mean: float, std: float, scale: float = 100.0) -> str:
        return "-" if math.isnan(mean) else f"{scale * mean:.1f} ± {scale * std:.1f}"

    head = ["method", "seeds", "rounds", "final acc (%)", "best acc (%)"]
    head += ["final F1 (%)"] if has_f1 else []
    head += [f"rounds to {100 * target:.0f}%", "MB up", "MB down"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["method"], str(r["seeds"]), str(r["rounds"]), pm(r["final_acc"], r["final_acc_std"]),
                 pm(r["best_acc"], r["best_acc_std"])]
        cells += [pm(r["final_f1"], r["final_f1_std"])] if has_f1 else []
        rt = "-" if math.isnan(r["rounds_to_target"]) else f"{r['rounds_to_target']:.1f} ({r['reached_target']})"
        cells += [rt, f"{r['mb_up']:.1f}", f"{r['mb_down']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")


def reset_cell(path: Path) -> None:
    """Remove a half-finished cell that cannot be resumed."""
    shutil.rmtree(path)


def run_grid(
    cells: list[tuple[Method, int, RunConfig]],
    reporter_for,
    say,
) -> None:
    """Run every cell not yet done, in order; resume half-finished ones from their checkpoint.

    ``reporter_for(i, n, method, seed, eta)`` gives the progress reporter of one cell; ``say`` prints.
    """
    import time

    from hlora.engine import resume, run

    seconds_per_round: list[float] = []
    for i, (method, seed, cfg) in enumerate(cells, start=1):
        path = Path(cfg.out)
        state = cell_state(path)
        if state == "done":
            say(f"cell {i}/{len(cells)} {method.label} seed {seed}: done, skipped")
            continue
        resumable = state == "partial" and (path / "config.yaml").exists()
        done_before = len(read_rows(path)) if resumable and (path / "metrics.jsonl").exists() else 0
        left = sum(c.rounds for _, _, c in cells[i - 1 :]) - done_before
        eta = statistics.fmean(seconds_per_round) * left if seconds_per_round else None
        reporter = reporter_for(i, len(cells), method, seed, eta)
        t0 = time.perf_counter()
        if resumable:
            result = resume(path, reporter)
        else:
            if state == "partial":
                reset_cell(path)
            result = run(cfg, reporter)
        ran = len(result.rows) - done_before  # a resumed cell ran only its remaining rounds
        if ran > 0:
            seconds_per_round.append((time.perf_counter() - t0) / ran)


def compare(
    config_file: str | Path | None,
    shared: dict[str, Any],
    methods: list[Method],
    seeds: list[int],
    out: Path,
    target: float,
    reporter_for,
    say=print,
    run_cells: bool = True,
) -> list[dict[str, Any]]:
    """Run the grid (skipping finished cells), then write table.md, table.csv and the figures.

    With ``run_cells`` False nothing runs: the tables and figures cover the cells finished so far.
    """
    from hlora.plots import plot_groups

    cells = cell_configs(config_file, shared, methods, seeds, out)
    if run_cells:
        out.mkdir(parents=True, exist_ok=True)
        run_grid(cells, reporter_for, say)
    table = summarize(out, methods, seeds, target)
    if not table:
        raise ConfigError(f"{out}: no cell of this grid has finished yet, so there is nothing to report")
    write_tables(table, out, target)
    done = lambda m, s: cell_state(out / m.slug / f"seed{s}") == "done"  # noqa: E731
    groups = {m.label: [read_rows(out / m.slug / f"seed{s}") for s in seeds if done(m, s)] for m in methods}
    plot_groups(groups, out, title=cells[0][2].task, reference=("majority class", majority_share(cells[0][2])))
    return table


def majority_share(cfg: RunConfig) -> float:
    """Dev accuracy of always predicting the dev set's most common label: the line a classifier must clear."""
    from hlora.data import load_task

    labels = load_task(cfg.task, cfg.train, cfg.dev, cfg.text_columns, cfg.label_column).dev.labels
    return max(labels.count(c) for c in set(labels)) / len(labels)
