"""The Flower runtime: simulation equivalence, loopback deployment, TLS and node authentication.

Needs the ``[flower]`` extra (CI installs it); without it the module is skipped, since the core
package does not depend on Flower. Every test uses a private FLWR_HOME and the offline settings
(no dependency installation, no telemetry) from ``fedoap.federation.flower_launch``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="Flower tests need pip install -e '.[flower]'")

from fedoap.algorithms import build_algorithm  # noqa: E402
from fedoap.api import run_experiment  # noqa: E402
from fedoap.config import ConfigError, save_config  # noqa: E402
from fedoap.federation.checkpoint import load_tensors  # noqa: E402
from fedoap.federation.flower_launch import FlowerSession, make_node_keys, make_tls  # noqa: E402
from fedoap.models.partition import sub  # noqa: E402
from fedoap.runs import read_metrics  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

pytestmark = pytest.mark.flower


def quiet(cfg, path):
    return run_experiment(cfg, path, progress=False, log=lambda s: None)


@pytest.mark.parametrize("mode", ["weights", "bank"])
def test_simulation_equals_in_process(tmp_path, mode, monkeypatch):
    """One round of FedOAP: same aggregated shared weights (1e-6) and the same client metrics."""
    monkeypatch.chdir(tmp_path)  # the Flower run folder is given relative, as users type it
    args = (
        "train.num_threads=1",
        "federation.rounds=1",
        "finetune.epochs=1",
        f"model.kv.mode={mode}",
    )
    ref = quiet(tiny_config(*args), tmp_path / "inprocess")
    sim = quiet(tiny_config(*args, "federation.runtime=flower-sim"), Path("flower"))
    assert sim["flower"]["status"] == "finished:completed"

    g_ref = sub(
        load_tensors(tmp_path / "inprocess" / "checkpoints" / "last.safetensors")[0], "global/"
    )
    g_sim = sub(
        load_tensors(tmp_path / "flower" / "checkpoints" / "last.safetensors")[0], "global/"
    )
    assert g_ref.keys() == g_sim.keys()
    assert any(k.startswith("kv.") for k in g_ref) == (mode == "bank")
    for k in g_ref:
        torch.testing.assert_close(g_sim[k], g_ref[k], rtol=0, atol=1e-6)

    rows_ref = read_metrics(tmp_path / "inprocess" / "metrics.csv")
    rows_sim = read_metrics(tmp_path / "flower" / "metrics.csv")
    key = ("round", "stage", "client", "val_dice", "val_case_dice", "best")
    assert [tuple(r[k] for k in key) for r in rows_sim] == [
        tuple(r[k] for k in key) for r in rows_ref
    ]
    for name, c in ref["clients"].items():
        assert sim["clients"][name]["best_round"] == c["best_round"]
        for m in ("dice", "iou", "case_dice"):
            assert sim["clients"][name]["test"][m] == pytest.approx(c["test"][m], abs=1e-9)
    assert sim["comm"]["bytes_up_per_round"] == ref["comm"]["bytes_up_per_round"]
    for rel in (
        "config.yaml",
        "metrics.csv",
        "summary.json",
        "checkpoints/last.safetensors",
        "plots/val_dice.png",
    ):
        assert (tmp_path / "flower" / rel).is_file(), rel
    assert (tmp_path / "flower" / "checkpoints" / "best" / "mri.safetensors").is_file()


def test_methods_that_need_individual_models_are_refused_before_anything_starts(tmp_path):
    for method in ("feddp", "centralized"):
        with pytest.raises(ConfigError, match="cannot run on Flower"):
            quiet(
                tiny_config(f"method={method}", "federation.runtime=flower-sim"), tmp_path / method
            )
        assert not (tmp_path / method).exists()


def _deploy(tmp_path, cfg, tls=False):
    """Start a SuperLink and one SuperNode per client on loopback; run; return Flower's entry."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")
    with FlowerSession(tmp_path / "flower") as fl:
        certs = make_tls(tmp_path / "certs") if tls else None
        fl.start_superlink(tls=certs, node_auth=tls)
        for c in cfg.data.clients:
            key = None
            if tls:
                key, pub = make_node_keys(tmp_path / "keys", c.name)
                fl.register_node(pub)
            fl.start_supernode(c.name, {"client-name": c.name}, tls=certs, private_key=key)
        rejected = None
        if tls:  # a node whose key was never registered must be refused
            bad_key, _ = make_node_keys(tmp_path / "keys", "intruder")
            rejected = fl.start_supernode(
                "intruder",
                {"client-name": cfg.data.clients[0].name},
                tls=certs,
                private_key=bad_key,
            )
        run = fl.wait(fl.run({"run-dir": str(run_dir.resolve())}), timeout=1200)
        nodes = fl.flwr_json("supernode", "list", fl.connection)["nodes"]
        if rejected is not None:
            deadline = time.time() + 60
            while rejected.poll() is None and time.time() < deadline:
                time.sleep(0.5)
            assert rejected.poll() not in (None, 0), "an unregistered SuperNode was not refused"
            assert (
                "Failed to activate SuperNode"
                in (tmp_path / "flower" / "logs" / "supernode-intruder.log").read_text()
            )
    return run, run_dir, nodes


def test_deployment_on_loopback(tmp_path):
    cfg = tiny_config("train.num_threads=1", "federation.rounds=2", "finetune.epochs=0")
    run, run_dir, _ = _deploy(tmp_path, cfg)
    assert run["status"] == "finished:completed"
    assert run["network-traffic"]["total-bytes"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["clients"]) == {"mri", "us", "ct"}
    assert len(read_metrics(run_dir / "metrics.csv")) == 2 * 3
    # No personal key ever reached the server: the strategy recorded every key set it received.
    alg = build_algorithm(cfg)
    model = alg.build_model()
    personal = set(alg.partition(model).personal)
    received = json.loads((run_dir / "flower_received_keys.json").read_text())
    assert len(received) == 2 * 3
    for keys in received:
        sent = {k.split(".", 1)[1] for k in keys if k.startswith("shared.")}
        assert keys and not sent & personal
        assert sent == set(alg.partition(model).shared)
    for c in cfg.data.clients:
        assert (run_dir / "checkpoints" / "best" / f"{c.name}.safetensors").is_file()


def test_deployment_with_tls_and_node_authentication(tmp_path):
    cfg = tiny_config("train.num_threads=1", "federation.rounds=1", "finetune.epochs=0")
    run, run_dir, nodes = _deploy(tmp_path, cfg, tls=True)
    assert run["status"] == "finished:completed"
    assert sum(n["status"] == "online" for n in nodes) >= 3
    assert (run_dir / "summary.json").is_file()


def test_the_clientapp_import_path_loads_no_monai_matplotlib_or_scipy():
    """Flower 1.42 starts a ClientApp process per message: every import is paid per message.
    MONAI (5.5 s here), matplotlib and scipy load only where used (HD95 on the test split,
    plots at the end of a run, synthetic data)."""
    import subprocess
    import sys

    code = (
        "import sys, fedoap.federation.flower, fedoap.algorithms, fedoap.training; "
        "print(sorted(m for m in ('monai', 'matplotlib', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
