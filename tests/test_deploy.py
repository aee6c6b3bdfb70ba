"""``fedoap provision`` and ``fedoap deploy``: kits from a project file, with no secret of one
party in another's kit, and (deployment tier) a federation started from its kits on loopback,
with TLS and SuperNode authentication, that ends where the in-process run ends."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedoap.config import ConfigError, load_config
from fedoap.data.synthetic import generate_client
from fedoap.deploy.kits import provision
from fedoap.deploy.project import load_project
from tests.conftest import tiny_config

SITES = ("mri", "us", "ct")


def write_data(root: Path) -> None:
    for name, style in zip(SITES, ("mri", "ultrasound", "ct"), strict=True):
        raw = generate_client(style, 30, 32, name)
        np.savez(root / f"{name}.npz", images=raw.images, masks=raw.masks, case_ids=raw.case_ids)


def write_project(tmp_path: Path, port: int = 9092, **extra) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    write_data(data)
    cfg = tiny_config("train.num_threads=1", "federation.rounds=2", "finetune.epochs=1").to_dict()
    cfg["data"]["root"] = str(data)
    cfg["data"]["clients"] = [{"name": n, "source": "npz", "path": f"{n}.npz"} for n in SITES]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    project = {
        "name": "loopback-study",
        "server": {"address": f"127.0.0.1:{port}"},
        "run": {"config": "run.yaml"},
        "federation": {"min_fit_fraction": 0.6, "round_timeout_s": 600},
        "sites": [{"name": n, "data": str(data / f"{n}.npz")} for n in SITES],
        **extra,
    }
    path = tmp_path / "project.yaml"
    path.write_text(yaml.safe_dump(project))
    return path


def private_keys(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` that holds a private key, by its path in the folder."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and b"PRIVATE KEY" in p.read_bytes()
    }


def test_no_kit_holds_a_secret_of_another_party(tmp_path):
    kits = provision(load_project(write_project(tmp_path)), tmp_path / "kits")
    operator = private_keys(kits["operator"])
    assert set(operator) == {"pki/ca.key", "superlink/server.key"}
    seen = set(operator.values())
    for name in SITES:
        own = private_keys(kits[name])
        assert set(own) == {f"{name}.key"}, own  # its own key, nothing of the CA or the server
        assert own[f"{name}.key"] not in seen  # no other kit holds it
        seen.add(own[f"{name}.key"])
        assert (kits[name] / f"{name}.key").stat().st_mode & 0o077 == 0
        # the operator holds the site's public key, which is the pair of the site's private key
        assert (kits["operator"] / "node-keys" / f"{name}.pub").read_bytes() == (
            kits[name] / f"{name}.pub"
        ).read_bytes()
        assert (kits[name] / "ca.crt").read_bytes() == (
            kits["operator"] / "pki" / "ca.crt"
        ).read_bytes()
        script = (kits[name] / "start-site.sh").read_text()
        assert f'client-name=\\"{name}\\"' in script and "127.0.0.1:" in script
        assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in script
    assert (kits["operator"] / "pki" / "ca.key").stat().st_mode & 0o077 == 0
    # k of n from the project file, in the run config the operator submits
    cfg = load_config(kits["operator"] / "config.yaml")
    assert cfg.federation.min_fit_fraction == 0.6 and cfg.federation.round_timeout_s == 600
    with pytest.raises(Exception, match="not empty"):
        provision(load_project(tmp_path / "project.yaml"), tmp_path / "kits")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"server": {"address": "fl.example.org"}}, "server.address: host:port"),
        (
            {"sites": [{"name": "mri", "data": "/d"}]},
            r"sites: each client .*missing: \['us', 'ct'\]",
        ),
        ({"sites": [{"name": "xx", "data": "/d"}]}, "sites\\[0\\].name: 'xx' is not a client"),
        ({"colour": 1}, "unknown key colour"),
        ({"federation": {"min_fit_fraction": 2}}, "federation.min_fit_fraction"),
    ],
)
def test_a_bad_project_file_is_one_error_naming_the_key(tmp_path, change, message):
    path = write_project(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc.update(change)
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=message):
        load_project(path)


def _free_port() -> int:
    from fedoap.federation.flower_launch import free_port

    return free_port()


def _start(script: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    with open(log, "ab") as fh:
        return subprocess.Popen(
            ["bash", str(script)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PATH": path, **env},
            start_new_session=True,
        )


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    from fedoap.federation.flower_launch import _descendants

    for pid in _descendants([p.pid for p in procs if p.poll() is None]):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


@pytest.mark.deployment
@pytest.mark.flower
def test_a_federation_started_from_its_kits_ends_where_the_in_process_run_ends(tmp_path):
    """The operator's three commands: fedoap provision (three sites), start-superlink.sh (TLS,
    SuperNode authentication, the sites' keys registered), fedoap deploy run, with each site
    started from its own kit: the result equals the in-process run of the same config, to
    1e-6."""
    pytest.importorskip("flwr")
    from fedoap.api import run_experiment

    port = _free_port()
    project = write_project(tmp_path, port)
    fedoap = [sys.executable, "-m", "fedoap.cli.main"]
    subprocess.run(
        [*fedoap, "provision", "-c", str(project), "-o", "kits"], cwd=tmp_path, check=True
    )
    kits = {"operator": tmp_path / "kits" / "operator"}
    kits.update({n: tmp_path / "kits" / "sites" / n for n in SITES})
    procs = [_start(kits["operator"] / "start-superlink.sh", tmp_path / "superlink.log", {})]
    try:
        for name in SITES:
            env = {
                "FEDOAP_SUPERNODE_PORT": str(_free_port()),
                "FEDOAP_RESTART_S": "2",
                "OMP_NUM_THREADS": "1",
            }
            procs.append(_start(kits[name] / "start-site.sh", tmp_path / f"{name}.log", env))
        done = subprocess.run(
            [*fedoap, "deploy", "run", "--kit", str(kits["operator"]), "--timeout", "1200"],
            capture_output=True,
            text=True,
        )
    finally:
        _stop_all(procs)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "finished:completed" in done.stdout
    run_dir = kits["operator"] / "runs" / "run-1"
    deployed = json.loads((run_dir / "summary.json").read_text())
    ref = run_experiment(load_config(kits["operator"] / "config.yaml"), tmp_path / "ref")
    assert deployed["clients"].keys() == ref["clients"].keys()
    for name, c in ref["clients"].items():
        assert deployed["clients"][name]["best_round"] == c["best_round"]
        for m in ("dice", "iou", "case_dice"):
            assert deployed["clients"][name]["test"][m] == pytest.approx(c["test"][m], abs=1e-6)
    for name in SITES:  # each site kept its model in its own kit's output folder
        assert (kits[name] / "output" / "checkpoints" / "best" / f"{name}.safetensors").is_file()
