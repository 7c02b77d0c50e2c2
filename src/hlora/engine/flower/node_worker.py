"""A node worker: one long-lived process per SuperNode and run that keeps the node's site loaded.

Flower 1.42 starts a new ClientApp process for every message; each would import torch and transformers
and load the base model and the node's data again. With node-config ``worker = true`` the ClientApp
stays thin (flwr, numpy and the standard library: no torch) and forwards each message to the node's
worker, which loads the site (:func:`hlora.engine.flower.node_site.load_site`) on its first request
and answers every later message of the run with it (:func:`hlora.engine.flower.node_site.serve`, the
function the ClientApp calls in-process when ``worker = false``).

* **Channel**: :mod:`multiprocessing.connection` on a Unix socket in the worker directory (node-config
  ``worker-dir``, default ``$TMPDIR/hlora-workers-UID``, mode 0700), authenticated with a random key in
  a 0600 file beside it. A request is the message's content as numpy arrays and plain values
  (:func:`to_plain`), the run-config, the node-config and the precision kept in the run state; the reply
  is the answer's content, or the one-line reason of an error reply.
* **One worker per node and run**: its socket is named after a hash of the node id, the run id, the
  run-config and the node-config, so anything that changes what is loaded (model, data, max-length,
  precision, threads, attention, dropout...) gets a worker of its own.
* **Starting**: a ClientApp process that finds no worker takes the lock file (``fcntl.flock``) beside
  the socket, checks again, starts the worker detached (``start_new_session``; its log is the ``.log``
  file beside the socket) and waits for it to accept (:data:`START_TIMEOUT`): two ClientApp processes
  never start two workers.
* **Stopping**: the worker exits after ``worker-idle`` seconds without a request (default
  :data:`DEFAULT_IDLE`), when the SuperNode that started it is gone (the nearest ``flower-supernode``
  ancestor of the ClientApp process, else its parent; checked every :data:`WATCH_SECONDS`), and on
  SIGTERM or SIGINT; it removes its socket.
* **Failure**: a worker that dies while it serves a message gives an error reply (:class:`WorkerError`)
  and the next message starts a new worker.

Run as ``python -m hlora.engine.flower.node_worker --socket PATH --authkey-file PATH --watch PID``
(the ClientApp does it).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

#: whether a node runs a worker when its node-config does not say: yes where the worker can run (Unix
#: sockets, ``flock``). Measured on MRPC (3 nodes, docs/performance.md section 7): a round takes 0.79x
#: the time of per-message loading, 0.91x the embedded simulation's round
DEFAULT_WORKER = os.name == "posix"
#: seconds a worker waits for its next request before it exits (node-config ``worker-idle``)
DEFAULT_IDLE = 300.0
#: seconds a ClientApp process waits for a worker it started to accept (imports and nothing else)
START_TIMEOUT = 300.0
#: seconds between two checks that the SuperNode is still there
WATCH_SECONDS = 1.0
#: node-config keys of the worker (see :func:`worker_options`)
WORKER_KEYS = ("worker", "worker-idle", "worker-dir")
#: the longest path a Unix socket may have (Linux: 108 bytes with the terminating NUL)
MAX_SOCKET_PATH = 107

#: the worker's own log (its ``.log`` file); the ClientApp logs to Flower's ``flwr.hlora``
wlog = logging.getLogger("hlora.node_worker")


class WorkerError(RuntimeError):
    """The node worker could not be started or reached, or died while it served a message."""


@dataclass
class WorkerOptions:
    """The node-config's worker settings."""

    enabled: bool = False
    idle: float = DEFAULT_IDLE
    directory: str | None = None

    def root(self) -> Path:
        return Path(self.directory).expanduser() if self.directory else \
            Path(tempfile.gettempdir()) / f"hlora-workers-{os.getuid()}"


def worker_options(node_config: Mapping[str, Any]) -> WorkerOptions:
    """Read ``worker`` (true or false; default :data:`DEFAULT_WORKER`), ``worker-idle`` (seconds > 0) and
    ``worker-dir``; a bad value raises :class:`WorkerError` with one line. Imports nothing heavy."""
    value = node_config.get("worker", DEFAULT_WORKER)
    if isinstance(value, bool):
        enabled = value
    elif str(value).strip().lower() in ("true", "1", "yes"):
        enabled = True
    elif str(value).strip().lower() in ("false", "0", "no", ""):
        enabled = False
    else:
        raise WorkerError(f"node-config: worker must be true or false, got {value!r}")
    try:
        idle = float(node_config.get("worker-idle", DEFAULT_IDLE))
    except (TypeError, ValueError):
        idle = -1.0
    if not idle > 0:
        raise WorkerError(f"node-config: worker-idle must be a number of seconds > 0, "
                          f"got {node_config.get('worker-idle')!r}")
    directory = str(node_config.get("worker-dir", "")).strip() or None
    return WorkerOptions(enabled, idle, directory)


# --- the message content as plain values (numpy arrays, lists, numbers, strings) ---------------------


def to_plain(content: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    """A RecordDict as ``{name: (kind, {key: value})}``: ArrayRecords as numpy arrays, ConfigRecords and
    MetricRecords as their values. Picklable without torch; :func:`from_plain` gives it back, equal."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    plain: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            plain[name] = ("arrays", {k: a.numpy() for k, a in record.items()})
        elif isinstance(record, ConfigRecord):
            plain[name] = ("config", dict(record))
        elif isinstance(record, MetricRecord):
            plain[name] = ("metrics", dict(record))
        else:  # pragma: no cover - Flower's three record kinds are the above
            raise TypeError(f"cannot forward a {type(record).__name__} to the node worker")
    return plain


def from_plain(plain: Mapping[str, tuple[str, Mapping[str, Any]]]) -> Any:
    """Inverse of :func:`to_plain`."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    content = RecordDict()
    for name, (kind, values) in plain.items():
        if kind == "arrays":
            record = ArrayRecord()
            for k, a in values.items():
                record[k] = Array(a)
            content[name] = record
        elif kind == "config":
            content[name] = ConfigRecord(dict(values))
        elif kind == "metrics":
            content[name] = MetricRecord(dict(values))
        else:
            raise TypeError(f"unknown record kind {kind!r}")
    return content


# --- the ClientApp's side ------------------------------------------------------------------------------


@dataclass
class WorkerPaths:
    """The files of one worker: socket, lock, authentication key, log."""

    socket: Path
    lock: Path
    authkey: Path
    log: Path

    @classmethod
    def of(cls, options: WorkerOptions, node_id: int, run_id: int, run_config: Mapping[str, Any],
           node_config: Mapping[str, Any]) -> WorkerPaths:
        identity = json.dumps([node_id, run_id, dict(run_config), dict(node_config)], sort_keys=True, default=str)
        name = hashlib.sha256(identity.encode()).hexdigest()[:20]
        root = options.root()
        base = root / name
        paths = cls(base.with_suffix(".sock"), base.with_suffix(".lock"), base.with_suffix(".key"),
                    base.with_suffix(".log"))
        if len(os.fsencode(paths.socket)) > MAX_SOCKET_PATH:
            raise WorkerError(f"node-config worker-dir {str(root)!r} is too long for a Unix socket path "
                              f"(at most {MAX_SOCKET_PATH - 26} characters)")
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if root.stat().st_uid != os.getuid():
            raise WorkerError(f"the worker directory {root} belongs to another user (node-config worker-dir)")
        return paths


@dataclass
class Answer:
    """A worker's reply to one message."""

    content: Any  # a RecordDict, or None for an error reply
    reason: str | None
    keep_precision: str | None
    #: the worker's pid and how many messages it has served (this one included)
    pid: int
    served: int
    #: this ClientApp process started the worker
    started: bool


def call_worker(options: WorkerOptions, paths: WorkerPaths, request: dict[str, Any]) -> Answer:
    """Send one request to the node's worker (started first if there is none); its answer. A worker that
    cannot be started, or dies before it answers, raises :class:`WorkerError`."""
    started = False
    attempt = _connect(paths)
    if attempt is None:
        with _locked(paths.lock):
            attempt = _connect(paths)  # another ClientApp process may have started it meanwhile
            if attempt is None:
                attempt = _start(options, paths)
                started = True
    conn, hello = attempt
    pid = int(hello["pid"])
    try:
        with conn:
            conn.send(request)
            reply = conn.recv()
    except (EOFError, OSError) as e:
        deadline = time.monotonic() + 2  # the connection closes a moment before the process is gone
        while (alive := _alive(pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        raise WorkerError(f"the node worker (pid {pid}) {'dropped the connection' if alive else 'died'} while "
                          f"serving this {request.get('kind')} message ({type(e).__name__}); the next message "
                          f"starts a new one. Its log: {paths.log}") from None
    content = None if reply.get("content") is None else from_plain(reply["content"])
    return Answer(content, reply.get("reason"), reply.get("keep_precision"), pid, int(reply.get("served", 0)),
                  started)


def _connect(paths: WorkerPaths) -> tuple[Connection, dict[str, Any]] | None:
    """A connection to a running worker, after its hello; None when there is none (or it is exiting)."""
    if not paths.socket.exists() or not paths.authkey.exists():
        return None
    conn = None
    try:
        conn = Client(str(paths.socket), family="AF_UNIX", authkey=paths.authkey.read_bytes())
        hello = conn.recv()
        if not isinstance(hello, dict) or "pid" not in hello:
            raise EOFError("no hello")
        return conn, hello
    except Exception:  # noqa: BLE001 - refused, stale, exiting, wrong key: no usable worker
        if conn is not None:
            conn.close()
        return None


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _start(options: WorkerOptions, paths: WorkerPaths) -> tuple[Connection, dict[str, Any]]:
    """Start a worker detached (the lock is held) and wait until it accepts."""
    with contextlib.suppress(FileNotFoundError):
        paths.socket.unlink()  # a stale socket of a worker that was killed
    fresh = paths.authkey.with_suffix(f".key.{os.getpid()}")
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))
    os.replace(fresh, paths.authkey)  # whole: a ClientApp reading it meanwhile gets the old key or the new
    watch = supernode_pid()
    command = [sys.executable, "-m", "hlora.engine.flower.node_worker", "--socket", str(paths.socket),
               "--authkey-file", str(paths.authkey), "--watch", str(watch), "--watch-start", str(_start_time(watch)),
               "--idle", repr(options.idle)]
    with open(paths.log, "ab") as out:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        attempt = _connect(paths)
        if attempt is not None:
            return attempt
        code = proc.poll()
        if code is not None:
            raise WorkerError(f"the node worker exited with code {code} before it accepted a message: "
                              f"{_tail(paths.log)} (log: {paths.log})")
        time.sleep(0.05)
    proc.kill()
    raise WorkerError(f"the node worker did not accept a message within {START_TIMEOUT:g} s (log: {paths.log})")


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def supernode_pid(pid: int | None = None) -> int:
    """The process that a worker started by ``pid`` (default: this process) watches: the nearest
    ``flower-supernode`` ancestor of ``pid``, else its parent (a ClientApp that no SuperNode started)."""
    parent = os.getppid() if pid is None else _ppid(pid)
    current = parent
    for _ in range(32):
        if current is None or current <= 1:
            break
        try:
            cmd = Path(f"/proc/{current}/cmdline").read_bytes().split(b"\0")
        except OSError:
            break
        if any(os.path.basename(part) == b"flower-supernode" for part in cmd):
            return current
        current = _ppid(current)
    return parent or 1


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _start_time(pid: int) -> int:
    """The process's start time (clock ticks since boot; 0 where /proc is missing): tells a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _alive(pid: int, start: int = 0) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] in ("Z", "X"):
            return False
        return not start or int(fields[19]) == start
    except (OSError, ValueError, IndexError):
        return True


# --- the worker ---------------------------------------------------------------------------------------


class Worker:
    """Serves requests on a socket, one at a time, until idle, orphaned or stopped."""

    def __init__(self, socket_path: Path, authkey_file: Path, watch: int, watch_start: int, idle: float) -> None:
        self.socket_path = socket_path
        self.authkey_file = authkey_file
        self.authkey = authkey_file.read_bytes()
        self.watch, self.watch_start, self.idle = watch, watch_start, idle
        self.listener = Listener(str(socket_path), family="AF_UNIX", backlog=16, authkey=self.authkey)
        os.chmod(socket_path, 0o600)
        self.inode = os.stat(socket_path).st_ino
        self.lock = threading.Lock()
        self.busy = False
        self.last = time.monotonic()
        self.served = 0

    def remove_socket(self) -> None:
        """Remove the socket if it is still this worker's (a new worker may have replaced a stale one)."""
        with contextlib.suppress(OSError):
            if os.stat(self.socket_path).st_ino == self.inode:
                os.unlink(self.socket_path)

    def exit(self, why: str) -> None:
        self.remove_socket()
        with contextlib.suppress(OSError):  # its key, unless a new worker's has replaced it
            if self.authkey_file.read_bytes() == self.authkey:
                self.authkey_file.unlink()
        wlog.info("node worker %d: exits (%s) after %d message(s)", os.getpid(), why, self.served)
        logging.shutdown()
        os._exit(0)

    def watchdog(self) -> None:
        """Exit when the SuperNode is gone; wake the main loop when idle for ``idle`` seconds."""
        nudged = 0.0
        while True:
            time.sleep(WATCH_SECONDS)
            if not _alive(self.watch, self.watch_start):
                self.exit(f"process {self.watch} that it watches is gone")
            try:
                replaced = os.stat(self.socket_path).st_ino != self.inode
            except OSError:
                replaced = True
            if replaced:  # no client can reach it any more
                self.exit("its socket was removed or replaced")
            with self.lock:
                idle = not self.busy and time.monotonic() - self.last >= self.idle
            if idle and time.monotonic() - nudged > 5:
                nudged = time.monotonic()
                # the main loop decides (a request may come first); it may be exiting already
                with contextlib.suppress(Exception), \
                        Client(str(self.socket_path), family="AF_UNIX", authkey=self.authkey) as conn:
                    conn.recv()
                    conn.send({"kind": "idle?"})

    def serve_forever(self) -> None:
        threading.Thread(target=self.watchdog, daemon=True).start()
        wlog.info("node worker %d: ready on %s (watches %d, idle %g s)", os.getpid(), self.socket_path,
                 self.watch, self.idle)
        while True:
            try:
                conn = self.listener.accept()
            except Exception as e:  # noqa: BLE001 - a client that failed the handshake
                wlog.warning("node worker %d: refused a connection: %s", os.getpid(), e)
                continue
            with self.lock:
                self.busy = True
            answered = False
            try:
                with conn:
                    conn.send({"pid": os.getpid(), "served": self.served})
                    request = conn.recv()
                    if request.get("kind") == "idle?":  # from the watchdog: no request since the last one
                        if time.monotonic() - self.last >= self.idle:
                            self.listener.close()
                            self.exit(f"idle for {self.idle:g} s")
                        continue
                    answered = True
                    conn.send(self.handle(request))
            except (EOFError, OSError) as e:
                wlog.warning("node worker %d: lost a client: %s", os.getpid(), e)
            finally:
                with self.lock:
                    self.busy = False
                    if answered:
                        self.last = time.monotonic()

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        from hlora.engine.flower import node_site

        kind = str(request["kind"])
        self.served += 1
        start = time.monotonic()
        wlog.info("node worker %d: serving %s (message %d)", os.getpid(), kind, self.served)
        try:
            served = node_site.serve(kind, from_plain(request["content"]), request["run_config"],
                                     request["node_config"], request.get("kept_precision"))
            content = None if served.content is None else to_plain(served.content)
            reason, keep = served.reason, served.keep_precision
        except Exception as e:  # noqa: BLE001 - serve catches its own; this is the plain-value conversion
            wlog.exception("node worker %d: failed", os.getpid())
            content, reason, keep = None, " ".join(f"{type(e).__name__}: {e}".split()), None
        wlog.info("node worker %d: served %s (message %d) in %.2f s%s", os.getpid(), kind, self.served,
                 time.monotonic() - start, f": error {reason}" if reason else "")
        return {"content": content, "reason": reason, "keep_precision": keep, "served": self.served}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hlora.engine.flower.node_worker",
                                     description="A node worker for the hlora ClientApp (started by it).")
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--authkey-file", required=True, type=Path)
    parser.add_argument("--watch", required=True, type=int, help="exit when this process is gone")
    parser.add_argument("--watch-start", type=int, default=0, help="its start time (/proc), against pid reuse")
    parser.add_argument("--idle", type=float, default=DEFAULT_IDLE, help="exit after this many idle seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    worker = Worker(args.socket, args.authkey_file, args.watch, args.watch_start, args.idle)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda s, _f: worker.exit(f"signal {s}"))
    worker.serve_forever()


if __name__ == "__main__":
    main()
