"""``fedoap deploy``: what the operator runs from the operator kit, as wrappers around ``flwr``
(its Flower profile written from the kit, the offline settings set): register the sites' keys,
run the study into a run folder and wait for it, list the runs, stop one."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from fedoap.config import load_config
from fedoap.deploy.kits import KIT_FILE
from fedoap.errors import ConfigError, FederationError, NotFoundError
from fedoap.federation.flower_launch import FlowerCLI, summary_written, wait_for_port
from fedoap.fileio import atomic_write_text

logger = logging.getLogger(__name__)


class OperatorKit:
    """An operator kit on disk (``fedoap provision``'s ``OUT/operator``)."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        path = folder / KIT_FILE
        if not path.is_file():
            raise NotFoundError(f"{path} not found: {folder} is not an operator kit")
        self.folder = folder.resolve()
        self.meta: dict[str, Any] = json.loads(path.read_text())
        if self.meta.get("role") != "operator":
            raise ConfigError(f"{path}: a site's kit; fedoap deploy runs from the operator kit")
        self.port = port or int(str(self.meta["address"]).rpartition(":")[2])
        # The operator talks to the SuperLink on its own host; the certificate names localhost.
        self.cli = FlowerCLI(self.folder / "flwr-home", self.meta["connection"], self.folder)
        self.cli.write_profile(f"localhost:{self.port}", self.folder / "pki" / "ca.crt")

    def wait_for_superlink(self, timeout: float = 120) -> None:
        if not wait_for_port(self.port, timeout):
            raise FederationError(f"no SuperLink listens on port {self.port} after {timeout:.0f} s")

    def register(self) -> list[str]:
        """Register every site's public key (``node-keys/*.pub``); a key registered before is
        kept. Returns the sites registered now."""
        self.wait_for_superlink()
        done = []
        for pub in sorted((self.folder / "node-keys").glob("*.pub")):
            res = self.cli.flwr("supernode", "register", str(pub), self.cli.connection)
            text = (res.stdout + res.stderr).lower()
            if res.returncode == 0 and "error" not in text:
                done.append(pub.stem)
            elif "already" not in text:
                raise FederationError(f"could not register {pub}: {res.stdout} {res.stderr}")
        return done

    def new_run_dir(self) -> Path:
        runs = self.folder / "runs"
        n = 1
        while (runs / f"run-{n}").exists():
            n += 1
        return runs / f"run-{n}"

    def run(
        self, run_dir: Path | None = None, resume: bool = False, timeout: float = math.inf
    ) -> tuple[Path, dict[str, Any]]:
        """Submit the study (the kit's ``config.yaml``, into a new run folder unless
        ``resume``) and wait until Flower reports it finished; returns the run folder and the
        run's ``flwr list`` entry."""
        if resume:
            if run_dir is None:
                raise ConfigError("--resume needs --run-dir, the run folder to resume")
            if not (run_dir / "config.yaml").is_file():
                raise NotFoundError(f"{run_dir / 'config.yaml'} not found: not a run folder")
        else:
            run_dir = run_dir or self.new_run_dir()
            if run_dir.exists() and any(run_dir.iterdir()):
                raise ConfigError(f"{run_dir} is not empty: choose a new run folder")
            cfg = load_config(self.folder / "config.yaml")
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        run_dir = run_dir.resolve()
        self.wait_for_superlink()
        config = {"run-dir": str(run_dir), "pin-node-keys": "true"}
        if resume:
            config["resume"] = "true"
        run_id = self.cli.run(config)
        logger.info(f"run {run_id} submitted; its folder: {run_dir}")
        atomic_write_text(run_dir / "flower-run-id.txt", f"{run_id}\n")
        run = self.cli.wait(run_id, timeout=timeout, done_hint=summary_written(run_dir))
        if run["status"] != "finished:completed":
            raise FederationError(
                f"run {run_id} ended with status {run['status']} ({run.get('status-details')}); "
                f"its log: flwr log {run_id} {self.cli.connection} (FLWR_HOME={self.cli.home})"
            )
        return run_dir, run

    def status(self) -> list[dict[str, Any]]:
        return list(self.cli.flwr_json("list", self.cli.connection).get("runs", []))

    def stop(self, run_id: str) -> None:
        out = self.cli.flwr_json("stop", run_id, self.cli.connection)
        if not out.get("success"):
            raise FederationError(f"could not stop run {run_id}: {out}")
