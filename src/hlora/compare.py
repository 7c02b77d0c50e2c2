"""A grid of runs (methods x seeds) on the same split, client ranks, client sample and seed; then tables.

Each cell is an ordinary run directory ``OUT/<method>/seed<k>``. A cell with a ``summary.json`` is done
and skipped, so an interrupted comparison resumes where it stopped (a half-finished cell continues from
its last checkpoint). A process runs a cell only while it holds the cell's lock (:func:`claim`), so
``--jobs`` worker processes and other ``hlora compare`` processes into the same directory never train the
same cell. The table itself is :mod:`hlora.report`'s.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from hlora.config import ConfigError, RunConfig, load_config, parse_options
from hlora.data.glue import default_target
from hlora.metrics import read_rows
from hlora.report import REFERENCE, TABLE, figure_prefix, summarize, write_tables

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


def _split_top(text: str, sep: str) -> list[str]:
    """Split at ``sep`` outside square brackets: ``a:b=[x:1,y:2]`` at ``:`` -> ``a``, ``b=[x:1,y:2]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if depth < 0:
            raise ConfigError(f"--strategies: unbalanced ']' in {text!r}")
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ConfigError(f"--strategies: unclosed '[' in {text!r}")
    return [*parts, text[start:]]


def _method_items(spec: str) -> list[str]:
    """Split the methods at commas, but keep a rank list whole: ``hlora:ranks=2,4,8,fedit`` -> ``hlora:ranks=2,4,8``
    and ``fedit`` (no strategy is named by a number); a bracketed value is one piece:
    ``hlora:layer_ranks=[query:2-4,value:8]``."""
    items: list[str] = []
    for part in (x.strip() for x in _split_top(spec, ",")):
        if part.isdigit() and items and "=" in items[-1]:
            items[-1] += "," + part
        elif part:
            items.append(part)
    return items


def _unbracket(pair: str) -> tuple[str, str] | None:
    """``key=[text]`` -> (key, text), the text taken as it is (not YAML); anything else -> None."""
    key, sep, value = pair.partition("=")
    value = value.strip()
    if sep and value.startswith("[") and value.endswith("]"):
        return key.strip().replace("-", "_"), value[1:-1]
    return None


def parse_methods(spec: str) -> list[Method]:
    """``"hlora,hlora:ranks=8,hetlora:norm_weights=true"`` -> methods (run options or strategy options). A value
    with colons or commas of its own goes in square brackets: ``hlora:layer_ranks=[query:2-4,value:8]``."""
    methods = []
    for item in _method_items(spec):
        name, *pairs = _split_top(item, ":")
        run_opts: dict[str, Any] = {}
        strat_opts = {}
        raw = dict(filter(None, map(_unbracket, pairs)))
        options = parse_options([p for p in pairs if _unbracket(p) is None]) | raw
        for key, value in options.items():
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
    from hlora.tracking import check_installed, in_grid

    cells = []
    for seed in seeds:
        for m in methods:
            overrides = {**shared, **m.overrides, "strategy": m.strategy, "seed": seed,
                         "out": str(out / m.slug / f"seed{seed}")}
            cfg = load_config(config_file, overrides)
            check_installed(cfg.log)
            in_grid(cfg, out, f"{m.label} seed{seed}")
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
_IGNORED = ("out", "client_ranks", "client_layer_ranks", "threads", "log", "log_group", "log_name", "mlflow_uri")


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


def cell_labels(out: Path) -> dict[str, str]:
    """Cell folder name -> method label (``hlora__ranks-8`` -> ``hlora:ranks=8``) of a compare directory, read
    from its ``table.csv``; empty when there is none."""
    table = Path(out) / "table.csv"
    if not table.is_file():
        return {}
    with table.open(newline="") as fh:
        return {Method(row["method"], "").slug: row["method"] for row in csv.DictReader(fh)}


def rounds_done(path: Path) -> int:
    """Rounds a cell has recorded in its ``metrics.jsonl`` (0 when it has none)."""
    return len(read_rows(path)) if (path / "metrics.jsonl").is_file() else 0


def reset_cell(path: Path) -> None:
    """Remove a half-finished cell that cannot be resumed."""
    shutil.rmtree(path)


def lock_path(cell: Path) -> Path:
    """``OUT/<method>/seed<k>.lock``: beside the cell, not in it (removing a cell keeps its lock)."""
    return cell.with_name(cell.name + ".lock")


@dataclass
class Claim:
    """This process's hold on a cell: an exclusive lock on the cell's lock file, which holds our pid."""

    cell: Path
    fd: int

    def release(self) -> None:
        """Remove the lock file, then unlock it (a process that opened it meanwhile finds it gone)."""
        try:
            lock_path(self.cell).unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)


def claim(cell: Path) -> Claim | None:
    """Take ``cell`` for this process, or None when another live process holds it.

    The claim is an ``fcntl.flock`` on ``<cell>.lock``, which the kernel releases when its holder ends,
    however it ends (kill -9 too): a lock left by a dead process is free to take, with no pid to check and
    no race between two processes taking over the same stale lock. Once locked, the path must still name
    the locked file (a holder that finished removes it, and a process that opened it before that must start
    again on a new one); then the file gets our pid, for the messages of other processes.
    """
    import fcntl

    lock = lock_path(cell)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            now = os.stat(lock)
        except FileNotFoundError:
            now = None
        mine = os.fstat(fd)
        if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return Claim(cell, fd)
        os.close(fd)


def holder(cell: Path) -> int | None:
    """The pid written in a cell's lock file (None: no lock, or not written yet)."""
    try:
        return int(lock_path(cell).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class CellResult:
    """What :func:`run_cell` did: ``ran`` (``rounds`` rounds in ``seconds``, ending with ``summary``),
    ``done`` (the cell had finished), or ``taken`` (another process holds it)."""

    status: str
    rounds: int = 0
    seconds: float = 0.0
    summary: dict[str, Any] | None = None


def run_cell(cfg: RunConfig, reporter_for_cell: Callable[[int], Any]) -> CellResult:
    """Claim the cell ``cfg.out``, then start it, resume it from its checkpoint, or start it again when it
    holds no config to resume from; leave it when it has finished or another process holds it.

    ``reporter_for_cell(rounds_done)`` gives the run's progress reporter, once the cell is claimed.
    """
    from hlora.engine import resume, run

    path = Path(cfg.out)
    held = claim(path)
    if held is None:
        return CellResult("taken")
    try:
        state = cell_state(path)
        if state == "done":
            return CellResult("done")
        resumable = state == "partial" and (path / "config.yaml").exists()
        done_before = rounds_done(path) if resumable else 0
        reporter = reporter_for_cell(done_before)
        t0 = time.perf_counter()
        if resumable:
            result = resume(path, reporter)
        else:
            if state == "partial":
                reset_cell(path)
            result = run(cfg, reporter)
        # a resumed cell ran only its remaining rounds
        return CellResult("ran", len(result.rows) - done_before, time.perf_counter() - t0, result.summary)
    finally:
        held.release()


Cell = tuple[int, Method, int, RunConfig]  # its number (from 1), method, seed, config


class _Queue:
    """The cells left to run, in grid order; a cell another process holds waits ``poll`` seconds before it
    is tried again."""

    def __init__(self, cells: list[tuple[Method, int, RunConfig]], poll: float) -> None:
        self.cells: list[Cell] = [(i, m, s, c) for i, (m, s, c) in enumerate(cells, start=1)]
        self.n = len(cells)
        self.poll = poll
        self.not_before: dict[int, float] = {}
        self.told: set[int] = set()  # cells said to be held by another process

    def __bool__(self) -> bool:
        return bool(self.cells)

    def pop(self) -> Cell | None:
        """The first cell that may be tried now (None: each waits for its next try)."""
        now = time.monotonic()
        for cell in self.cells:
            if self.not_before.get(cell[0], 0.0) <= now:
                self.cells.remove(cell)
                return cell
        return None

    def later(self, cell: Cell, say: Callable[[str], None]) -> None:
        """Another process holds ``cell``: say so once, try it again after the others."""
        if cell[0] not in self.told:
            pid = holder(Path(cell[3].out))
            say(f"{name(cell, self.n)}: running in another process{f' (pid {pid})' if pid else ''}; "
                "waiting for it")
            self.told.add(cell[0])
        self.not_before[cell[0]] = time.monotonic() + self.poll
        self.cells.append(cell)

    def wait(self) -> float | None:
        """Seconds until a waiting cell may be tried again (None: no cell waits)."""
        if not self.cells:
            return None
        return max(0.0, min(self.not_before.get(c[0], 0.0) for c in self.cells) - time.monotonic())

    def skip_done(self, cell: Cell, say: Callable[[str], None]) -> bool:
        """Whether ``cell`` has finished (then say so): skipped."""
        if cell_state(Path(cell[3].out)) != "done":
            return False
        say(f"{name(cell, self.n)}: " + ("finished by another process" if cell[0] in self.told
                                          else "done, skipped"))
        return True

    def rounds_left(self, *extra: Cell) -> int:
        """Rounds of the unfinished cells (``extra`` and those queued) not yet recorded."""
        return sum(c.rounds - rounds_done(Path(c.out)) for _, _, _, c in (*extra, *self.cells)
                   if cell_state(Path(c.out)) != "done")


def name(cell: Cell, n: int) -> str:
    return f"cell {cell[0]}/{n} {cell[1].label} seed {cell[2]}"


def run_grid(
    cells: list[tuple[Method, int, RunConfig]],
    reporter_for,
    say,
    jobs: int = 1,
    poll: float = 5.0,
) -> None:
    """Run every cell not yet done; resume half-finished ones from their checkpoint.

    ``jobs`` 1: one cell after the other in this process; ``reporter_for(i, n, method, seed, eta)`` gives a
    cell's progress reporter. ``jobs`` > 1: that many cells at once, each in a process of its own (spawned),
    which prints a line when it starts and one per round; ``say`` prints when one ends. A cell that another
    process holds (another ``hlora compare`` into the same directory) is left to it and tried again every
    ``poll`` seconds: this returns when every cell is done, whoever ran it.
    """
    queue = _Queue(cells, poll)
    if jobs > 1:
        _run_processes(queue, say, jobs)
        return
    seconds_per_round: list[float] = []
    while queue:
        cell = queue.pop()
        if cell is None:
            time.sleep(queue.wait() or 0.0)
            continue
        if queue.skip_done(cell, say):
            continue
        i, method, seed, cfg = cell

        def reporter_for_cell(done_before: int, cell: Cell = cell):
            left = queue.rounds_left(cell)
            eta = statistics.fmean(seconds_per_round) * left if seconds_per_round else None
            return reporter_for(i, queue.n, method, seed, eta)

        result = run_cell(cfg, reporter_for_cell)
        if result.status == "taken":
            queue.later(cell, say)
        elif result.status == "done":
            queue.skip_done(cell, say)
        elif result.rounds > 0:
            seconds_per_round.append(result.seconds / result.rounds)


class CellLines:
    """The progress of a cell in a process of its own (``--jobs`` > 1): a line when it starts, one per round
    (two cells' bars could not share a terminal)."""

    def __init__(self, prefix: str, eta: float | None, done_before: int = 0) -> None:
        self.prefix, self.eta, self.rounds = prefix, eta, 0

    def _line(self, text: str) -> None:
        print(self.prefix + text, file=sys.stderr, flush=True)

    def start(self, cfg: RunConfig, out: Path, first_round: int) -> None:
        self.rounds = cfg.rounds
        again = f", resuming at round {first_round}" if first_round > 1 else ""
        left = f", about {self.eta / 60:.0f} min left in the grid" if self.eta is not None else ""
        self._line(f"started (pid {os.getpid()}, {cfg.threads} thread(s){again}{left}) -> {out}")

    def round_start(self, round: int, examples: int) -> None: ...

    def advance(self, examples: int) -> None: ...

    def round_end(self, row: dict[str, Any]) -> None:
        score = f"acc {row['accuracy']:.4f}" if "accuracy" in row else "(not evaluated)"
        self._line(f"round {row['round']}/{self.rounds}  {score}  {row['seconds']:.1f}s")

    def finish(self, summary: dict[str, Any]) -> None: ...


def _cell_process(conn, cfg: RunConfig, prefix: str, eta: float | None) -> None:
    """A spawned process: run one cell (:func:`run_cell`); send back its result, or the exception and its
    traceback."""
    import traceback

    try:
        conn.send(("result", run_cell(cfg, functools.partial(CellLines, prefix, eta))))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the grid's process
        tb = traceback.format_exc()
        try:
            conn.send(("error", e, tb))
        except Exception:  # noqa: BLE001 - an exception that does not pickle
            conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}"), tb))
    finally:
        conn.close()


class CellFailed(Exception):
    """The traceback of an exception raised in a cell's process (the cause of the one re-raised here)."""


def _naming(error: BaseException, cell: str) -> BaseException:
    """``error`` of the same type with the cell's name in front of its message (as it is, when it takes
    another form of arguments, or is an interrupt)."""
    if not isinstance(error, Exception) or len(error.args) != 1 or not isinstance(error.args[0], str):
        return error
    try:
        return type(error)(f"{cell}: {error.args[0]}")
    except Exception:  # noqa: BLE001 - a constructor that wants something else
        return error


def _run_processes(queue: _Queue, say, jobs: int) -> None:
    """Up to ``jobs`` cells at once, each in a spawned process; stop them all at the first error (their
    cells resume from their checkpoints next time)."""
    import multiprocessing
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("spawn")
    running: dict[Any, tuple[Any, Cell]] = {}  # pipe end -> (process, cell)
    seconds_per_round: list[float] = []
    try:
        while queue or running:
            while len(running) < jobs and (cell := queue.pop()) is not None:
                if queue.skip_done(cell, say):
                    continue
                left = queue.rounds_left(cell, *(c for _, c in running.values()))
                eta = statistics.fmean(seconds_per_round) * left / jobs if seconds_per_round else None
                prefix = f"[{cell[0]}/{queue.n} {cell[1].label} s{cell[2]}] "
                here, there = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_cell_process, args=(there, cell[3], prefix, eta),
                                   name=f"hlora-cell-{cell[0]}")
                proc.start()
                there.close()
                running[here] = (proc, cell)
            if not running:
                time.sleep(queue.wait() or 0.0)
                continue
            for conn in wait(list(running), timeout=queue.wait() if len(running) < jobs else None):
                proc, cell = running.pop(conn)
                try:
                    message = conn.recv()
                except EOFError:  # it died before it could answer
                    message = None
                conn.close()
                proc.join()
                if message is None:
                    message = ("error", RuntimeError(f"its process ended with exit code {proc.exitcode}"), "")
                if message[0] == "error":
                    _, error, tb = message
                    raise _naming(error, name(cell, queue.n)) from (CellFailed(tb) if tb else None)
                result: CellResult = message[1]
                if result.status == "taken":
                    queue.later(cell, say)
                elif result.status == "done":
                    queue.skip_done(cell, say)
                else:
                    if result.rounds > 0:
                        seconds_per_round.append(result.seconds / result.rounds)
                    final = (result.summary or {}).get("final_accuracy", math.nan)
                    say(f"{name(cell, queue.n)}: finished, final accuracy {final:.4f}, "
                        f"{result.rounds} rounds in {result.seconds / 60:.1f} min")
    finally:
        for conn, (proc, _) in running.items():  # an error or an interrupt: stop the other cells
            proc.terminate()
        for conn, (proc, _) in running.items():
            proc.join()
            conn.close()


def grid_precision(cells: list[tuple[Method, int, RunConfig]], say=print) -> str | None:
    """``--precision auto`` once for the whole grid, so that every cell computes at the same precision.

    Each run left to ``auto`` times a few batches of each precision when it starts; cells started side by
    side time them on a shared machine and may choose differently (two SST-2 runs started together chose
    fp32, docs/performance.md section 7), which would mix two precisions in one table. Here the new cells
    (no config.yaml yet) that are left to ``auto`` get the choice of a cell of this grid that ran before,
    or else one probe of the first of them, made before any cell starts. Cells that hold a config keep
    their own (they resume at it). Returns the choice (None: no cell is left to ``auto``)."""
    fresh = [cfg for _, _, cfg in cells if cfg.precision == "auto" and not (Path(cfg.out) / "config.yaml").is_file()]
    if not fresh:
        return None
    saved = (load_config(path, {"out": str(path.parent)}).precision
             for path in (Path(cfg.out) / "config.yaml" for _, _, cfg in cells) if path.is_file())
    choice = next((p for p in saved if p != "auto"), None)
    how = "as the grid's earlier cells"
    if choice is None:
        from hlora.engine.simulation import setup

        choice = setup(replace(fresh[0])).cfg.precision  # a copy: setup fills in what it resolves
        how = "timed once, before any cell"
    for cfg in fresh:
        cfg.precision = choice
    say(f"precision auto: {choice} for the grid's {len(fresh)} new cell(s) ({how})")
    return choice


def compare(
    config_file: str | Path | None,
    shared: dict[str, Any],
    methods: list[Method],
    seeds: list[int],
    out: Path,
    target: float | None,
    reporter_for,
    say=print,
    run_cells: bool = True,
    jobs: int = 1,
    reference: str = REFERENCE,
    table_name: str = TABLE,
) -> list[dict[str, Any]]:
    """Run the grid (skipping finished cells), then write table.md, table.csv and the figures.

    ``jobs`` > 1 runs that many cells at once, each in its own process at 1 thread unless the settings
    name ``threads`` (see :func:`run_grid`). With ``run_cells`` False nothing runs: the tables and figures
    cover the cells finished so far. ``reference``: the method (a label of ``methods``) every other is
    compared with, per seed and by the bootstrap. ``target`` None: the task's (:func:`default_target`).
    ``table_name``: another name than ``table`` writes NAME.md, NAME.csv, NAME-accuracy.png and
    NAME-communication.png instead, beside the grid's own table (e.g. a subset of its methods against
    another reference).
    """
    from hlora.plots import plot_groups

    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    # in any case: on a case-insensitive filesystem x.MD names x.md, and TABLE.md the grid's own table.md
    folded = table_name.lower()
    if (not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", table_name) or folded.endswith((".md", ".csv"))
            or (folded == TABLE and table_name != TABLE)):
        raise ConfigError(f"--table is a file name without a folder or extension (letters, digits, _ . -), "
                          f"got {table_name!r}")
    labels = [m.label for m in methods]
    if reference != REFERENCE and reference not in labels:
        raise ConfigError(f"--reference {reference!r} is not a method of --strategies ({', '.join(labels)})")
    cells = cell_configs(config_file, shared, methods, seeds, out)
    if target is None:
        target = default_target(cells[0][2].task)
    if run_cells:
        if jobs > 1:
            for _, _, cfg in cells:
                cfg.threads = cfg.threads or 1
        out.mkdir(parents=True, exist_ok=True)
        grid_precision(cells, say)
        run_grid(cells, reporter_for, say, jobs=jobs)
    path = lambda m, s: out / m.slug / f"seed{s}"  # noqa: E731
    done = {m.label: {s: path(m, s) for s in seeds if cell_state(path(m, s)) == "done"} for m in methods}
    if not any(done.values()):
        raise ConfigError(f"{out}: no cell of this grid has finished yet, so there is nothing to report")
    majority = majority_share(cells[0][2])
    table = summarize(done, target, reference, majority=majority)
    write_tables(table, out, target, reference, majority, name=table_name)
    groups = {label: [read_rows(path) for path in runs.values()] for label, runs in done.items()}
    plot_groups(groups, out, title=cells[0][2].task, reference=("majority class", majority),
                prefix=figure_prefix(table_name))
    return table


def majority_share(cfg: RunConfig) -> float:
    """Dev accuracy of always predicting the dev set's most common label: the line a classifier must clear."""
    from hlora.data import load_task

    labels = load_task(cfg.task, cfg.train, cfg.dev, cfg.text_columns, cfg.label_column).dev.labels
    return max(labels.count(c) for c in set(labels)) / len(labels)
