"""Experiment tracking: the run's rows, config and summary in TensorBoard, MLflow or W&B (``--log``).

Every backend is one small class with the same four calls: ``start(run_dir, config, resume)``,
``log_round(row, step)`` (a ``metrics.jsonl`` row, step = its round), ``log_summary(summary)`` and
``finish()``. The engines never see them: :class:`~hlora.metrics.MetricsLog` hands each row and the summary
to a :class:`Tracking` (all the backends asked for), which the engine opens with :func:`open_tracking`.

What a round logs (:func:`round_scalars`): every number of its row (scores, ``train_loss``, bytes, seconds;
``skipped`` as 0/1, ``rejected`` as a count) and the update's energy kept by a truncation to each client
rank (``energy_kept/rank_R``); in TensorBoard and W&B also the curves of each sampled client
(:func:`client_scalars`: ``client/ID/train_loss`` and ``client/ID/rank``), which MLflow leaves out: its run
page lists every metric in one flat list, where two per client would bury the round's. At the end: the
summary under ``summary/``; the resolved config as MLflow params, W&B config, and TensorBoard text and
hparams.

Resume continues the same run in each backend, with no step logged twice: TensorBoard writes to the same
``OUT/tb`` with ``purge_step`` at the first round it logs again (the rounds a killed process logged after
its last checkpoint are dropped, then recomputed); MLflow reopens the run whose id ``OUT/tracking.json``
holds and skips the steps it already has; W&B takes the same id with ``resume="allow"`` and skips the
steps ``tracking.json`` says it logged.

The packages are optional extras; a backend asked for but not installed fails before the run loads
anything (:func:`check_installed`, one line). A backend that fails in the middle of a run is dropped with
a warning: ``metrics.jsonl`` still has every round.
"""

from __future__ import annotations

import atexit
import json
import logging
import netrc
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hlora.config import ConfigError, RunConfig

log = logging.getLogger("hlora.tracking")

#: ``OUT/tracking.json``: each backend's run id (and W&B's last step), for resume
STATE = "tracking.json"


def round_scalars(row: dict[str, Any]) -> dict[str, float]:
    """Every number of a ``metrics.jsonl`` row but its round, as ``{name: value}``: the per-rank energy kept
    as ``energy_kept/rank_R``, ``skipped`` as 0/1, ``rejected`` as a count. A value that is None (no
    accepted update, hence no train loss) is left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "round":
            continue
        if key == "energy_kept":
            out.update({f"energy_kept/rank_{r}": float(e) for r, e in value.items()})
        elif key == "rejected":
            out[key] = float(len(value))
        elif isinstance(value, (bool, int, float)):
            out[key] = float(value)
    return out


def client_scalars(row: dict[str, Any]) -> dict[str, float]:
    """Each sampled client's train loss (``client_train_loss``: accepted updates only) and rank, as
    ``client/ID/train_loss`` and ``client/ID/rank``. A centralized round trains one pooled site, not the
    sampled clients: it has none."""
    clients, ranks = row.get("clients", []), row.get("ranks", [])
    rank_of = dict(zip(clients, ranks)) if len(clients) == len(ranks) else {}
    losses = row.get("client_train_loss", {})
    out: dict[str, float] = {}
    for c in clients:
        if str(c) in losses:
            out[f"client/{c}/train_loss"] = float(losses[str(c)])
        if c in rank_of:
            out[f"client/{c}/rank"] = float(rank_of[c])
    return out


def summary_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """The numbers of ``summary.json``, as ``summary/NAME`` (apart from the rounds' own curves)."""
    return {f"summary/{k}": float(v) for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def flat_config(config: dict[str, Any]) -> dict[str, str | int | float | bool]:
    """The config with lists as ``a,b`` and mappings as ``k=v,...``, None as ``none`` (for MLflow params
    and TensorBoard hparams, which take scalars)."""
    def flat(v: Any) -> str | int | float | bool:
        if v is None:
            return "none"
        if isinstance(v, dict):
            return ",".join(f"{k}={flat(x)}" for k, x in v.items())
        if isinstance(v, (list, tuple)):
            return ",".join(map(str, v))
        return v

    return {k: flat(v) for k, v in config.items()}


def run_name(run_dir: Path, config: dict[str, Any]) -> str:
    """The run's name in a tracker: ``log_name`` (``hlora compare`` sets ``METHOD seedK``), else the run
    directory's name."""
    return config.get("log_name") or run_dir.name


def _saved(run_dir: Path, backend: str) -> dict[str, Any]:
    path = run_dir / STATE
    return json.loads(path.read_text()).get(backend, {}) if path.is_file() else {}


def _save(run_dir: Path, backend: str, values: dict[str, Any]) -> None:
    path = run_dir / STATE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    saved[backend] = values
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(saved, indent=2) + "\n")
    tmp.replace(path)


class Tracker:
    """A backend. ``resume``: continue the run this directory logged before, rather than start one."""

    def start(self, run_dir: Path, config: dict[str, Any], resume: bool) -> None: ...
    def log_round(self, row: dict[str, Any], step: int) -> None: ...
    def log_summary(self, summary: dict[str, Any]) -> None: ...
    def finish(self) -> None: ...


class TensorBoard(Tracker):
    """``OUT/tb``, through ``torch.utils.tensorboard``'s SummaryWriter (``tensorboard --logdir OUT``)."""

    def start(self, run_dir: Path, config: dict[str, Any], resume: bool) -> None:
        self.log_dir, self.config = run_dir / "tb", config
        self.writer = None  # resumed: opened by the first round it logs again
        if not resume:
            self.writer = self._open(None)
            text = "\n".join(f"    {k}: {v}" for k, v in flat_config(config).items())
            self.writer.add_text("config", text, 0)

    def _open(self, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.log_dir), purge_step=purge_step)

    def log_round(self, row: dict[str, Any], step: int) -> None:
        if self.writer is None:  # resumed: drop what the stopped process logged from this step on
            self.writer = self._open(step)
        for key, value in {**round_scalars(row), **client_scalars(row)}.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # before the checkpoint: a resume starts after what is on disk

    def log_summary(self, summary: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        if self.writer is None:
            self.writer = self._open(None)
        metrics = summary_scalars(summary)
        step = int(summary.get("rounds", 0))
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        # hparams in this run's own file (SummaryWriter.add_hparams would start another run beside it)
        writer = self.writer._get_file_writer()
        for event in hparams(flat_config(self.config), metrics):
            writer.add_summary(event)
        self.writer.flush()

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()


def mlflow_uri(run_dir: Path, uri: str | None) -> str:
    """``--mlflow-uri``, or the local file store ``OUT/mlruns``."""
    return uri or (run_dir / "mlruns").resolve().as_uri()


class MLflow(Tracker):
    """A run in the experiment ``log_group`` (default ``hlora``) of ``--mlflow-uri`` (default: a file store in
    ``OUT/mlruns``; ``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri OUT/mlruns``)."""

    def start(self, run_dir: Path, config: dict[str, Any], resume: bool) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri = mlflow_uri(run_dir, config.get("mlflow_uri"))
        if urlparse(uri).scheme in ("", "file"):  # MLflow 3 keeps its file store behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        self.done, self.last_step = False, 0
        saved = _saved(run_dir, "mlflow") if resume else {}
        if saved.get("run_id") and saved.get("uri") == uri:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            history = self.client.get_metric_history(self.run_id, "seconds")
            self.last_step = max((m.step for m in history), default=0)
            return
        experiment = self._experiment(config.get("log_group") or "hlora")
        run = self.client.create_run(experiment, run_name=run_name(run_dir, config),
                                     tags={"hlora.run_dir": str(run_dir.resolve())})
        self.run_id = run.info.run_id
        _save(run_dir, "mlflow", {"uri": uri, "run_id": self.run_id})
        params = [Param(k, str(v)[:6000]) for k, v in flat_config(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another cell's process created it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_round(self, row: dict[str, Any], step: int) -> None:
        if step > self.last_step:
            self._metrics(round_scalars(row), step)
            self.last_step = step

    def log_summary(self, summary: dict[str, Any]) -> None:
        self._metrics(summary_scalars(summary), int(summary.get("rounds", 0)))
        self.client.log_dict(self.run_id, summary, "summary.json")
        self.done = True

    def finish(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if self.done else "KILLED")


def wandb_logged_in() -> bool:
    """Whether W&B has an API key here: ``WANDB_API_KEY``, or ``wandb login``'s entry in ``~/.netrc``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandB(Tracker):
    """A W&B run in project ``WANDB_PROJECT`` (default ``hlora``), group ``log_group``, files in
    ``OUT/wandb``. Offline unless W&B has an API key here (or ``WANDB_MODE`` says otherwise): a run never waits for the
    network. ``wandb sync OUT/wandb/offline-run-*`` uploads it later (a resumed run's parts in order)."""

    def start(self, run_dir: Path, config: dict[str, Any], resume: bool) -> None:
        if not wandb_logged_in():
            os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        saved = _saved(run_dir, "wandb") if resume else {}
        self.run_dir, self.done = run_dir, False
        self.last_step = int(saved.get("last_step", 0))
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "hlora"), name=run_name(run_dir, config),
            group=config.get("log_group"), id=saved.get("id"), resume="allow", dir=str(run_dir),
            config=config, allow_val_change=True,
        )
        self.id = self.run.id
        _save(run_dir, "wandb", {"id": self.id, "last_step": self.last_step})

    def log_round(self, row: dict[str, Any], step: int) -> None:
        if step > self.last_step:
            self.run.log({**round_scalars(row), **client_scalars(row)}, step=step)
            self.last_step = step
            _save(self.run_dir, "wandb", {"id": self.id, "last_step": step})

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.run.summary.update({f"summary/{k}": v for k, v in summary.items()})
        self.done = True

    def finish(self) -> None:
        self.run.finish(exit_code=0 if self.done else 1)


#: --log name -> (its backend, the module it needs; the extra that installs it has the same name)
BACKENDS: dict[str, tuple[type[Tracker], str]] = {
    "tensorboard": (TensorBoard, "tensorboard"),
    "mlflow": (MLflow, "mlflow"),
    "wandb": (WandB, "wandb"),
}


def check_installed(names: list[str]) -> None:
    """Raise a one-line :class:`ConfigError` for the first backend in ``names`` whose package is missing."""
    import importlib

    for name in names:
        module = BACKENDS[name][1]
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(f"--log {name}: the {module} package is not installed "
                              f"(pip install \"hlora[{name}]\")") from None


class Tracking:
    """The backends of a run, called together; one that fails mid-run is dropped with a warning. Finished
    at the latest when the process exits (an engine that raised: its MLflow run is marked KILLED)."""

    def __init__(self, trackers: dict[str, Tracker] | None = None) -> None:
        self.trackers = dict(trackers or {})
        atexit.register(self.finish)

    def _each(self, call: str, *args: Any) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                getattr(tracker, call)(*args)
            except Exception as e:  # noqa: BLE001 - tracking must not stop a run
                log.warning("--log %s: %s failed (%s: %s); going on without it (metrics.jsonl has every "
                            "round)", name, call, type(e).__name__, e)
                del self.trackers[name]

    def log_round(self, row: dict[str, Any], step: int) -> None:
        self._each("log_round", row, step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self._each("log_summary", summary)

    def finish(self) -> None:
        self._each("finish")
        self.trackers.clear()
        atexit.unregister(self.finish)

    def __enter__(self) -> "Tracking":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()


def open_tracking(cfg: RunConfig, run_dir: Path, resume: bool) -> Tracking:
    """Start every backend of ``cfg.log`` for the run in ``run_dir`` (a new run, or the same one again on
    ``resume``). A backend that cannot start (a server that does not answer) fails the run here, before
    its first round, with one line."""
    check_installed(cfg.log)
    config = cfg.to_dict()
    started = Tracking()
    for name in cfg.log:
        tracker = BACKENDS[name][0]()
        try:
            tracker.start(run_dir, config, resume)
        except Exception as e:  # noqa: BLE001 - any backend's error, said in one line
            started.finish()
            raise ConfigError(f"--log {name}: could not start ({type(e).__name__}: {e})") from None
        started.trackers[name] = tracker
    return started


def in_grid(cfg: RunConfig, grid: Path, name: str) -> None:
    """A cell of ``hlora compare`` into ``grid``: its own run named ``name``, grouped by the grid (MLflow
    experiment and W&B group: ``log_group``, default the grid directory's name; MLflow store: default
    ``GRID/mlruns``, one for the whole grid)."""
    if not cfg.log:
        return
    cfg.log_name = name
    cfg.log_group = cfg.log_group or grid.resolve().name
    if "mlflow" in cfg.log and cfg.mlflow_uri is None:
        cfg.mlflow_uri = mlflow_uri(grid, None)
