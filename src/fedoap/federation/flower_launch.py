"""Starting, driving and stopping Flower services from Python (simulation and loopback
deployment), with the offline settings these machines need (docs/flower.md).

A :class:`FlowerSession` owns a private ``FLWR_HOME``, starts ``flower-superlink`` (and the
services it starts) in its own process group, writes the CLI's connection profile,
submits a run with ``flwr run``, reads the run's status from ``flwr list --format json`` (success
is ``finished:completed``, never ``flwr run``'s exit code) and stops every service by PID.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from fedoap.errors import FederationError, NotFoundError
from fedoap.fileio import open_append

APP_DIR = Path(__file__).with_name("flower_app")

#: Environment every Flower process gets: no dependency installation (offline), no telemetry.
OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_executable(name: str) -> str:
    """A Flower executable from this Python's environment."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise NotFoundError(
            f"{name} not found: install the Flower extra (pip install -e '.[flower]')"
        )
    return found


@dataclass(frozen=True)
class TLSFiles:
    """A SuperLink's TLS files: the CA certificate the nodes and the CLI trust, and the
    SuperLink's certificate and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _descendants(roots: list[int]) -> list[int]:
    """Every live descendant process of ``roots`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class FlowerCLI:
    """The ``flwr`` command line against one SuperLink connection, with its own ``FLWR_HOME``
    (whose ``config.toml`` names the connection) and the offline settings: submit a run, read
    its status from ``flwr list --format json`` (success is ``finished:completed``, never
    ``flwr run``'s exit code), wait for it, stop it."""

    def __init__(self, home: Path, connection: str, workdir: Path) -> None:
        self.home, self.connection, self.workdir = home, connection, workdir
        # Flower's services start each other by name (flower-superexec, flwr-serverapp, ...):
        # this Python's scripts folder goes first on PATH.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(self.home), "PATH": path}

    def write_profile(self, address: str, ca_cert: Path | None) -> None:
        """``FLWR_HOME/config.toml``: the connection to ``address``, over TLS trusting
        ``ca_cert`` (None: plain HTTP, for loopback only)."""
        lines = [
            "[superlink]",
            f'default = "{self.connection}"',
            "",
            f"[superlink.{self.connection}]",
            f'address = "{address}"',
        ]
        lines += ["insecure = true"] if ca_cert is None else [f'root-certificates = "{ca_cert}"']
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    def flwr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [flower_executable("flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.workdir,
        )

    def flwr_json(self, *args: str) -> dict[str, Any]:
        res = self.flwr(*args, "--format", "json")
        try:
            return dict(json.loads(res.stdout))
        except json.JSONDecodeError as err:
            raise RuntimeError(
                f"flwr {' '.join(args)} failed: {res.stdout[-1500:]} {res.stderr[-1500:]}"
            ) from err

    def run(self, run_config: dict[str, str], app: Path = APP_DIR) -> str:
        """Submit the app; returns the run id."""
        overrides = " ".join(f"{k}='{v}'" for k, v in run_config.items())
        out = self.flwr_json("run", str(app), self.connection, "--run-config", overrides)
        if not out.get("success"):
            raise RuntimeError(f"flwr run failed: {out}")
        return str(out["run-id"])

    def status(self, run_id: str) -> dict[str, Any]:
        out = self.flwr_json("list", self.connection)
        for run in out.get("runs", []):
            if str(run["run-id"]) == run_id:
                return dict(run)
        raise RuntimeError(f"run {run_id} not listed by the SuperLink: {out}")

    def wait(
        self,
        run_id: str,
        timeout: float = 3600,
        poll: float = 2.0,
        done_hint: Callable[[], bool] | None = None,
        slow_poll: float = 30.0,
    ) -> dict[str, Any]:
        """Block until the run finishes; returns its ``flwr list`` entry.

        Each status query is a ``flwr`` CLI process (about 2.5 CPU-seconds of imports here),
        which on a small machine competes with the run itself. With ``done_hint`` (a cheap
        check, e.g. that the run wrote its summary), the SuperLink is asked every ``poll``
        seconds only once the hint holds, and otherwise every ``slow_poll`` seconds (to notice a
        run that failed without finishing)."""
        end = time.time() + timeout
        asked = -math.inf
        while time.time() < end:
            hint = done_hint is None or done_hint()
            if time.time() - asked >= (poll if hint else slow_poll):
                asked = time.time()
                run = self.status(run_id)
                if str(run["status"]).startswith("finished"):
                    return run
            time.sleep(0.5 if done_hint is not None else poll)
        raise TimeoutError(f"run {run_id} not finished after {timeout} s")


class FlowerSession(FlowerCLI):
    """Flower services for one run, under ``workdir`` (FLWR_HOME, logs). Use as a context
    manager: every process it started is stopped on exit, by PID (its whole process group)."""

    def __init__(self, workdir: Path, connection: str = "fedoap") -> None:
        # Absolute: flwr resolves FLWR_HOME from its own working directory.
        self.workdir = workdir.resolve()
        self.home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        super().__init__(self.home, connection, self.workdir)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.address: str | None = None
        self.stop_leftovers()

    @property
    def pid_file(self) -> Path:
        return self.workdir / "pids.json"

    def stop_leftovers(self) -> None:
        """Stop the services an earlier session in this folder left running (its process was
        killed before it could stop them): their process groups are in ``pids.json``."""
        if not self.pid_file.is_file():
            return
        try:
            pids = [int(p) for p in json.loads(self.pid_file.read_text())]
        except (ValueError, TypeError):
            pids = []
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue
        self.pid_file.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------- services

    def _spawn(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open_append(self.logs / f"{name}.log")
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env or self.env, start_new_session=True
        )
        log.close()
        self.procs.append(proc)
        self.pid_file.write_text(json.dumps([p.pid for p in self.procs]))
        return proc

    def start_superlink(
        self,
        simulation: bool = False,
        tls: TLSFiles | None = None,
        node_auth: bool = False,
        port: int | None = None,
    ) -> str:
        port = port or free_port()
        cmd = [
            flower_executable("flower-superlink"),
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
            "--database",
            str(self.workdir / "superlink.db"),
        ]
        cmd += ["--simulation"] if simulation else []
        if tls is None:
            cmd.append("--insecure")
        else:
            cmd += [
                "--ssl-certfile",
                str(tls.server_cert),
                "--ssl-keyfile",
                str(tls.server_key),
                "--ssl-ca-certfile",
                str(tls.ca_cert),
            ]
        if node_auth:
            cmd.append("--enable-supernode-auth")
        self._spawn("superlink", cmd)
        self.address = f"127.0.0.1:{port}"
        self.write_connection(tls)
        self._wait_port(port)
        return self.address

    def stop(self) -> None:
        # Flower's services start others in sessions of their own (SuperExec, the ServerApp, the
        # ClientApps and fedoap's site workers): stop every descendant too, not only our groups.
        for pid in _descendants([p.pid for p in self.procs if p.poll() is None]):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        deadline = time.time() + 15
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
        self.pid_file.unlink(missing_ok=True)

    def write_connection(self, tls: TLSFiles | None = None) -> None:
        assert self.address is not None
        self.write_profile(self.address, None if tls is None else tls.ca_cert)

    def configure_simulation(self, num_supernodes: int, cpus_per_client: int = 1) -> None:
        out = self.flwr_json(
            "federation",
            "simulation-config",
            "@none/default",
            self.connection,
            "--num-supernodes",
            str(num_supernodes),
            "--client-resources-num-cpus",
            str(cpus_per_client),
        )
        if not out.get("success"):
            raise RuntimeError(f"could not configure the simulation: {out}")

    def _wait_port(self, port: int, timeout: float = 60) -> None:
        def alive() -> None:
            if self.procs and self.procs[0].poll() is not None:
                raise RuntimeError(f"flower-superlink exited: see {self.logs / 'superlink.log'}")

        if not wait_for_port(port, timeout, alive):
            raise TimeoutError(f"flower-superlink did not listen on {port} within {timeout} s")


def wait_for_port(port: int, timeout: float, check: Callable[[], None] | None = None) -> bool:
    """Whether something listens on local ``port`` within ``timeout`` seconds; ``check`` runs
    between tries (to raise when the process that should listen has died)."""
    end = time.time() + timeout
    while time.time() < end:
        if check is not None:
            check()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


def summary_written(run_dir: Path) -> Callable[[], bool]:
    """A ``wait`` hint: the ServerApp has written (or rewritten) ``run_dir/summary.json``,
    which it does as the run's last step."""
    path = run_dir / "summary.json"

    def mtime() -> int | None:
        try:
            return path.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    before = mtime()
    return lambda: mtime() not in (None, before)


def run_simulation(run_dir: Path, num_clients: int, resume: bool = False) -> dict[str, Any]:
    """``federation.runtime=flower-sim``: the run folder's config through Flower's simulation
    runtime (a local SuperLink with ``--simulation``). With ``resume``, the server continues
    from its checkpoint and each site from its own folder. Returns Flower's run entry."""
    with FlowerSession(run_dir / "flower") as fl:
        fl.start_superlink(simulation=True)
        fl.configure_simulation(num_clients)
        # this process holds the run folder's lock (fedoap.runs.RunDir.lock) for the ServerApp
        config = {"run-dir": str(run_dir.resolve()), "lock-held": "true"}
        run_id = fl.run({**config, "resume": "true"} if resume else config)
        logger.info(f"Flower run {run_id} submitted to {fl.address}")
        run = fl.wait(run_id, done_hint=summary_written(run_dir))
    if run["status"] != "finished:completed":
        raise FederationError(
            f"Flower run {run_id} ended with status {run['status']} ({run.get('status-details')}); "
            f"logs in {run_dir / 'flower' / 'logs'}"
        )
    return run
