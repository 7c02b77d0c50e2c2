"""A Flower deployment on 127.0.0.1 for tests: a SuperLink, SuperNodes, ``flwr run`` and cleanup.

Every process is started in its own session with an environment marker; :meth:`Cluster.close` stops
the process groups it started, then every process that still carries the marker (Flower's
``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` children, some in sessions of their own),
and returns what it could not stop.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

BIN = Path(sys.executable).parent
APP = Path(__file__).resolve().parents[1] / "flower-app"
#: this checkout's package: Flower's processes (SuperLink, SuperNodes, the apps they start) import it first,
#: so the tests run this code even where another checkout of hlora is installed
SRC = Path(__file__).resolve().parents[1] / "src"
MARK = "HLORA_TEST_CLUSTER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, key, sign_key, ca: bool, san=None):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(sign_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hlora test CA")])
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    ca_cert = cert(ca_name, ca_name, ca_key, ca_key, True)
    san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    server_cert = cert(name, ca_name, key, ca_key, False, san)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    files["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return files


def make_node_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's EC key pair in OpenSSH format (what ``ssh-keygen -t ecdsa -b 384`` writes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


class Cluster:
    """A SuperLink and SuperNodes on 127.0.0.1 with free ports, insecure or with TLS."""

    def __init__(self, root: Path, tls: bool = False, node_auth: bool = False, database: bool = False) -> None:
        """``database``: the SuperLink keeps its state (nodes, runs) in ``root/superlink.db``, so it can
        be restarted without the SuperNodes."""
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.home = root / "flwr-home"
        self.home.mkdir(exist_ok=True)
        self.mark = uuid.uuid4().hex
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]),
            MARK: self.mark,
        }
        self.certs = make_certificates(root / "certs") if tls else None
        self.node_auth = node_auth
        self.database = root / "superlink.db" if database else None
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        connection = f'address = "{self.address}"\n'
        connection += f'root-certificates = "{self.certs["ca"]}"\n' if self.certs else "insecure = true\n"
        toml = f'[superlink]\ndefault = "test"\n\n[superlink.test]\n{connection}'
        (self.home / "config.toml").write_text(toml)

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                                start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def _tls(self, node: bool) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        if node:
            return ["--root-certificates", str(self.certs["ca"])]
        return ["--ssl-ca-certfile", str(self.certs["ca"]), "--ssl-certfile", str(self.certs["cert"]),
                "--ssl-keyfile", str(self.certs["key"])]

    def start_superlink(self) -> None:
        auth = ["--enable-supernode-auth"] if self.node_auth else []
        auth += ["--database", str(self.database)] if self.database else []
        proc = self._start("superlink", [str(BIN / "flower-superlink"), *self._tls(False), *auth,
                                         "--host", "127.0.0.1", "--port", str(self.port),
                                         "--disable-runtime-dependency-installation"])
        deadline = time.monotonic() + 60  # a loaded machine: `flwr run` right away may find no SuperLink yet
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)

    def start_node(self, name: str, node_config: str) -> None:
        auth = ["--auth-supernode-private-key", str(self.register(name))] if self.node_auth else []
        self._start(name, [str(BIN / "flower-supernode"), *self._tls(True), *auth,
                           "--superlink", self.address, "--port", str(free_port()),
                           "--node-config", node_config])

    def register(self, name: str, timeout: float = 60) -> Path:
        """An EC key pair (OpenSSH format) for a node, its public key registered with ``flwr supernode
        register`` (retried until the SuperLink answers); returns the private key's path."""
        private, public = make_node_keys(self.root / "keys", name)
        deadline = time.monotonic() + timeout
        while True:
            res = self.flwr("supernode", "register", str(public), "test")
            if res.returncode == 0:
                return private
            if time.monotonic() > deadline:
                raise RuntimeError(f"flwr supernode register failed: {res.stdout}{res.stderr}")
            time.sleep(1)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], check=False, env=self.env, cwd=self.root,
                              capture_output=True, text=True, timeout=timeout)

    def run(self, run_config: str, wait: float = 0) -> str:
        """``flwr run`` the hlora app with run-config overrides; returns the run id. ``wait``: seconds to
        retry while the SuperLink does not answer yet (just started)."""
        deadline = time.monotonic() + wait
        while True:
            res = self.flwr("run", str(APP), "test", "--format", "json", "--run-config", run_config)
            if (res.returncode == 0 and '"run-id"' in res.stdout) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert res.returncode == 0 and '"run-id"' in res.stdout, res.stdout + res.stderr
        return json.loads(res.stdout)["run-id"]

    def status(self, run_id: str) -> dict:
        res = self.flwr("list", "test", "--run-id", run_id, "--format", "json")
        assert res.returncode == 0, res.stdout + res.stderr
        return json.loads(res.stdout)["runs"][0]

    def wait(self, run_id: str, timeout: float) -> dict:
        """Poll ``flwr list`` until the run has finished; its final status (``flwr run`` exit codes
        do not tell)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.status(run_id)
            if run["status"].startswith("finished"):
                return run
            time.sleep(2)
        raise TimeoutError(f"run {run_id} did not finish within {timeout} s; logs in {self.root}")

    def descendants(self, name: str) -> list[tuple[int, str]]:
        """(pid, command) of the processes started by ``name`` that are still running."""
        pgid = self.procs[name].pid
        return [(pid, cmd) for pid, cmd, group in _processes() if group == pgid or pid == pgid]

    def kill(self, name: str) -> None:
        """SIGKILL a SuperNode (or the SuperLink) and its process group, as a crash would."""
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def crash_superlink(self) -> None:
        """SIGKILL the SuperLink's machine, as a power cut would: the ServerApp processes (``flwr-serverapp``),
        the SuperExec that started them (``--parent-pid`` of the SuperLink) and the SuperLink's group. The
        SuperNodes keep running."""
        pid = self.procs["superlink"].pid
        marked = set(self.marked())
        for victim, cmd, _ in _processes():
            if victim in marked and ("flwr-serverapp" in cmd or f"--parent-pid {pid}" in cmd):
                try:
                    os.kill(victim, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.kill("superlink")

    def close(self) -> list[tuple[int, str]]:
        """Stop every process this cluster started; return the ones still running (should be none)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        deadline = time.monotonic() + 5  # a moment for those that watch their parent (node workers)
        while self.marked() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.marked():  # children in sessions of their own, or orphaned
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        return [(pid, cmd) for pid, cmd, _ in _processes() if pid in set(self.marked())]

    def marked(self) -> list[int]:
        """Running (not zombie) processes whose environment carries this cluster's marker."""
        needle = f"{MARK}={self.mark}".encode()
        found = []
        for pid, _, _ in _processes():
            try:
                if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    found.append(pid)
            except OSError:
                continue
        return found


def _processes() -> list[tuple[int, str, int]]:
    """(pid, command line, process group) of the running, non-zombie processes (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] == "Z":
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            out.append((int(entry.name), cmd, int(fields[2])))
        except (OSError, ValueError, IndexError):
            continue
    return out
