"""A Flower federation on loopback, for the deployment tests and for trying fedoap on one
machine: throw-away TLS certificates and SuperNode keys, a SuperLink with one SuperNode per
site, and a whole run.

``python -m tests.flower_helpers CONFIG RUN_DIR [--tls]`` (what ``scripts/flower_loopback.sh``
runs) resolves CONFIG into ``RUN_DIR/config.yaml``, starts the SuperLink (with ``--tls``: TLS
and SuperNode authentication, every site's key registered) and one SuperNode per client of the
config, submits the app, waits for Flower's own run status (``finished:completed``), writes it
to ``RUN_DIR/flower/run.json``, prints each client's test Dice and stops every service by PID.
``FEDOAP_SUPERLINK_PORT`` sets the SuperLink's port (9092); each SuperNode's PyTorch gets an
equal share of this machine's cores (``OMP_NUM_THREADS``; ``FEDOAP_SITE_THREADS`` overrides
it): four sites with two threads each on two cores trained ~20x slower than in-process
(busy-waiting OpenMP threads).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedoap.config import load_config
from fedoap.deploy.pki import make_node_keys, make_tls
from fedoap.errors import ConfigError
from fedoap.federation.flower_launch import (
    FlowerSession,
    TLSFiles,
    flower_executable,
    free_port,
    summary_written,
)


class LoopbackSession(FlowerSession):
    """A :class:`FlowerSession` that also runs the sites: SuperNodes on this machine."""

    def start_supernode(
        self,
        name: str,
        node_config: dict[str, Any],
        tls: TLSFiles | None = None,
        private_key: Path | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        assert self.address is not None, "start the SuperLink first"
        cfg = " ".join(
            f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in node_config.items()
        )
        cmd = [
            flower_executable("flower-supernode"),
            "--superlink",
            self.address,
            "--port",
            str(free_port()),
            "--node-config",
            cfg,
        ]
        cmd += ["--insecure"] if tls is None else ["--root-certificates", str(tls.ca_cert)]
        if private_key is not None:
            cmd += ["--auth-supernode-private-key", str(private_key)]
        return self._spawn(f"supernode-{name}", cmd, {**self.env, **(extra_env or {})})

    def register_node(self, public_key: Path) -> None:
        out = self.flwr_json("supernode", "register", str(public_key), self.connection)
        if not out.get("success"):
            raise RuntimeError(f"could not register {public_key}: {out}")

    def start_sites(
        self,
        folder: Path,
        names: list[str],
        tls: bool = False,
        port: int | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> tuple[TLSFiles | None, dict[str, subprocess.Popen[bytes]]]:
        """A SuperLink and one SuperNode per site (``client-name``). With ``tls``: TLS (the
        certificates in ``folder/certs``) and SuperNode authentication, each site's key (in
        ``folder/keys``) registered before its node starts. Returns the TLS files and the
        SuperNode processes by site."""
        certs = make_tls(folder / "certs") if tls else None
        self.start_superlink(tls=certs, node_auth=tls, port=port)
        nodes = {}
        for name in names:
            key = None
            if tls:
                key, pub = make_node_keys(folder / "keys", name)
                self.register_node(pub)
            nodes[name] = self.start_supernode(
                name, {"client-name": name}, tls=certs, private_key=key, extra_env=extra_env
            )
        return certs, nodes


def site_threads(num_sites: int) -> int:
    """Threads per site when ``num_sites`` sites share this machine's cores."""
    if os.environ.get("FEDOAP_SITE_THREADS"):
        return int(os.environ["FEDOAP_SITE_THREADS"])
    return max(1, len(os.sched_getaffinity(0)) // num_sites)


def loopback(config: Path, run_dir: Path, tls: bool, port: int) -> int:
    """A whole federation on loopback (see the module docstring); returns the exit status."""
    if run_dir.exists():
        print(f"error: {run_dir} exists; choose a new run folder", file=sys.stderr)
        return 2
    try:
        cfg = load_config(config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True)
    run_dir = run_dir.resolve()
    # The resolved config goes where the ServerApp reads it; the sites come from it.
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    names = [c.name for c in cfg.data.clients]
    threads = {"OMP_NUM_THREADS": str(site_threads(len(names)))}
    with LoopbackSession(run_dir / "flower", connection="loopback") as fl:
        fl.start_sites(fl.workdir, names, tls=tls, port=port, extra_env=threads)
        run_id = fl.run({"run-dir": str(run_dir)})
        print(f"run {run_id} submitted to {fl.address} with {len(names)} SuperNodes", flush=True)
        run = fl.wait(run_id, timeout=math.inf, done_hint=summary_written(run_dir))
    print(f"Flower status: {run['status']}")
    (fl.workdir / "run.json").write_text(json.dumps(run, indent=2))
    if run["status"] != "finished:completed":
        print(f"see {fl.logs}", file=sys.stderr)
        return 1
    summary = json.loads((run_dir / "summary.json").read_text())
    for name, c in summary["clients"].items():
        print(f"{name:14s} test Dice {c['test']['dice']:.3f}")
    print(f"mean           test Dice {summary['mean']['test']['dice']:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/flower_loopback.sh",
        description="A whole Flower federation of a fedoap config on this machine (loopback).",
    )
    parser.add_argument("config", type=Path, help="a fedoap config (YAML)")
    parser.add_argument("run_dir", type=Path, help="a new run folder")
    parser.add_argument("--tls", action="store_true", help="TLS and SuperNode authentication")
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("FEDOAP_SUPERLINK_PORT", "9092")),
        help="the SuperLink's port (default: $FEDOAP_SUPERLINK_PORT or 9092)",
    )
    args = parser.parse_args(argv)
    return loopback(args.config, args.run_dir, args.tls, args.port)


if __name__ == "__main__":
    sys.exit(main())
