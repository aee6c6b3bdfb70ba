"""The Flower runtime: simulation equivalence, loopback deployment, TLS and node authentication.

The tests that start, kill and resume real SuperLink/SuperNode processes are marked
``deployment``: minutes each on two cores, left out of the default suite and run by
``python -m pytest -m deployment`` (CI runs both).

Needs the ``[flower]`` extra (CI installs it); without it the module is skipped, since the core
package does not depend on Flower. Every test uses a private FLWR_HOME and the offline settings
(no dependency installation, no telemetry) from ``fedoap.federation.flower_launch``; the
loopback federations are set up by ``tests/flower_helpers.py``, as ``scripts/flower_loopback.sh``
sets up its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="Flower tests need pip install -e '.[flower]'")

from fedoap.algorithms import build_algorithm  # noqa: E402
from fedoap.api import resume_experiment, run_experiment  # noqa: E402
from fedoap.config import ConfigError, save_config  # noqa: E402
from fedoap.federation.checkpoint import load_tensors, peek_meta  # noqa: E402
from fedoap.federation.flower_launch import (  # noqa: E402
    FlowerSession,
    _descendants,
    summary_written,
)
from fedoap.models.partition import sub  # noqa: E402
from fedoap.runs import read_metrics  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.flower_helpers import LoopbackSession, make_node_keys  # noqa: E402

pytestmark = pytest.mark.flower


def quiet(cfg, path):
    return run_experiment(cfg, path, progress=False)


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


@pytest.mark.parametrize(
    "privacy",
    [
        # sample-level DP-SGD at each site (Opacus), fine-tuning included in the budget
        ("method=fedoap", "privacy.dp.enabled=true", "privacy.dp.epsilon=4"),
        # client-level DP-FedAvg: the server clips each site's update and adds noise
        ("method=fedavg", "privacy.client_dp.enabled=true", "privacy.client_dp.noise_multiplier=1"),
    ],
    ids=["dp-sgd", "dp-fedavg"],
)
def test_dp_on_flower_spends_the_same_budget_and_gives_the_same_model_as_in_process(
    tmp_path, privacy, monkeypatch
):
    """Both DP mechanisms on the Flower simulation runtime: the same noisy shared weights and the
    same spent (epsilon, delta) per site as in-process, so the privacy ledger does not depend on
    the runtime."""
    monkeypatch.chdir(tmp_path)
    args = (
        "train.num_threads=1",
        "train.precision=fp32",
        "federation.rounds=1",
        "finetune.epochs=1",
        *privacy,
    )
    ref = quiet(tiny_config(*args), tmp_path / "inprocess")
    sim = quiet(tiny_config(*args, "federation.runtime=flower-sim"), Path("flower"))
    assert sim["flower"]["status"] == "finished:completed"

    assert sim["privacy"] == ref["privacy"]
    if "privacy.dp.enabled=true" in privacy:
        spent = ref["privacy"]["clients"]
        assert set(spent) == set(ref["clients"])
        for c in spent.values():  # the round and the fine-tuning epoch, both in the budget
            assert c["steps"] == c["planned_steps"] > 0 and 0 < c["epsilon"] <= 4
    else:
        assert ref["privacy"]["client_level"]["rounds"] == 1
        assert ref["privacy"]["client_level"]["epsilon"] > 0

    g_ref = sub(
        load_tensors(tmp_path / "inprocess" / "checkpoints" / "last.safetensors")[0], "global/"
    )
    g_sim = sub(
        load_tensors(tmp_path / "flower" / "checkpoints" / "last.safetensors")[0], "global/"
    )
    assert g_ref.keys() == g_sim.keys()
    for k in g_ref:
        torch.testing.assert_close(g_sim[k], g_ref[k], rtol=0, atol=1e-6)
    for name, c in ref["clients"].items():
        assert sim["clients"][name]["test"]["dice"] == pytest.approx(c["test"]["dice"], abs=1e-9)


def test_methods_that_need_individual_models_are_refused_before_anything_starts(tmp_path):
    for method in ("feddp", "centralized"):
        with pytest.raises(ConfigError, match="cannot run on Flower"):
            quiet(
                tiny_config(f"method={method}", "federation.runtime=flower-sim"), tmp_path / method
            )
        assert not (tmp_path / method).exists()


def _kill_server_app(fl):
    """SIGKILL the ServerApp process of this session's SuperLink (not the SuperLink itself)."""
    # The SuperLink's SuperExec starts it in a session of its own, pointed at the SuperLink.
    pattern = f"flwr-serverapp --runtime-api-address {fl.address}"
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    assert pids, "no ServerApp process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def _deploy(tmp_path, cfg, tls=False, kill_server_after=None):
    """Start a SuperLink and one SuperNode per client on loopback; run; return Flower's entry.
    With ``kill_server_after=k``, the ServerApp is SIGKILLed once step k is checkpointed and the
    run is submitted again with ``resume='true'``."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")
    with LoopbackSession(tmp_path / "flower") as fl:
        certs, _ = fl.start_sites(tmp_path, [c.name for c in cfg.data.clients], tls=tls)
        rejected = None
        if tls:  # a node whose key was never registered must be refused
            bad_key, _ = make_node_keys(tmp_path / "keys", "intruder")
            rejected = fl.start_supernode(
                "intruder",
                {"client-name": cfg.data.clients[0].name},
                tls=certs,
                private_key=bad_key,
            )
        run_id = fl.run({"run-dir": str(run_dir.resolve())})
        if kill_server_after is not None:
            _wait_for(
                lambda: _position(run_dir)[1] >= kill_server_after, 600, "no checkpoint to kill at"
            )
            _kill_server_app(fl)
            assert not (run_dir / "summary.json").exists()
            killed = run_id
            run_id = fl.run({"run-dir": str(run_dir.resolve()), "resume": "true"})
        run = fl.wait(run_id, timeout=1200, done_hint=summary_written(run_dir))
        if kill_server_after is not None:
            assert fl.status(killed)["status"] != "finished:completed"
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


def _global(run_dir):
    return sub(load_tensors(run_dir / "checkpoints" / "last.safetensors")[0], "global/")


def _assert_same_run(a, b, run_a, run_b):
    """Same per-client metrics (every validation row and the test scores) to 1e-6, and the same
    final global weights."""
    rows_a, rows_b = read_metrics(run_a / "metrics.csv"), read_metrics(run_b / "metrics.csv")
    key = ("round", "stage", "client", "sampled", "best")
    assert [tuple(r[k] for k in key) for r in rows_a] == [tuple(r[k] for k in key) for r in rows_b]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for k in ("train_loss", "val_dice", "val_case_dice"):
            if ra[k] or rb[k]:
                assert float(ra[k]) == pytest.approx(float(rb[k]), abs=1e-6), (ra, k)
    assert a["clients"].keys() == b["clients"].keys()
    for name, c in a["clients"].items():
        assert b["clients"][name]["best_round"] == c["best_round"]
        for m in ("dice", "iou", "case_dice"):
            assert b["clients"][name]["test"][m] == pytest.approx(c["test"][m], abs=1e-6)
    ga, gb = _global(run_a), _global(run_b)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=0, atol=1e-6)


@pytest.mark.deployment
def test_deployment_killed_and_resumed_equals_simulation_with_tls_and_node_auth(tmp_path):
    """Real processes on loopback (SuperLink, one SuperNode per site, TLS, registered node
    keys; an unregistered node is refused). The ServerApp is SIGKILLed after round 1 and the
    run resubmitted with resume='true': the server continues from its checkpoint, the sites
    from their folders, and the result is what Flower's simulation gives, to 1e-6, in fp32
    (the federated rounds, the fine-tuning epoch and the test)."""
    cfg = tiny_config("train.num_threads=1", "federation.rounds=2", "finetune.epochs=1")
    run, run_dir, nodes = _deploy(tmp_path, cfg, tls=True, kill_server_after=1)
    assert run["status"] == "finished:completed"
    assert sum(n["status"] == "online" for n in nodes) >= 3
    assert run["network-traffic"]["total-bytes"] > 0
    deployed = json.loads((run_dir / "summary.json").read_text())
    sim = quiet(
        tiny_config(
            "train.num_threads=1",
            "federation.rounds=2",
            "finetune.epochs=1",
            "federation.runtime=flower-sim",
        ),
        tmp_path / "sim",
    )
    _assert_same_run(sim, deployed, tmp_path / "sim", run_dir)
    # One message per site per step: 2 rounds, 1 fine-tuning epoch, the test.
    steps = deployed["transport"]["steps"]
    assert [(s["round"], s["stage"]) for s in steps] == [
        (1, "federated"),
        (2, "federated"),
        (3, "finetune"),
        (4, "test"),
    ]
    assert all(set(s["sites"]) == {"mri", "us", "ct"} for s in steps)
    # No personal key ever reached the server: it recorded every key set it received.
    alg = build_algorithm(cfg)
    model = alg.build_model()
    personal = set(alg.partition(model).personal)
    received = json.loads((run_dir / "flower_received_keys.json").read_text())
    assert len(received) == 2 * 3
    for keys in received:
        sent = {k.split(".", 1)[1] for k in keys if k.startswith("shared.")}
        assert keys and not sent & personal
        assert sent == set(alg.partition(model).shared)
    for c in cfg.data.clients:  # each site's own folder: its model, metrics and test scores
        assert (run_dir / "checkpoints" / "best" / f"{c.name}.safetensors").is_file()
        own = json.loads((run_dir / "sites" / c.name / "test.json").read_text())
        assert own["test"]["dice"] == deployed["clients"][c.name]["test"]["dice"]
        assert len(read_metrics(run_dir / "sites" / c.name / "metrics.csv")) == 3


def _position(run_dir):
    meta = peek_meta(run_dir / "checkpoints" / "last.safetensors")
    return (meta["position"]["stage"], meta["position"]["done"]) if meta else ("federated", 0)


def _wait_for(predicate, timeout, what):
    end = time.time() + timeout
    while not predicate():
        if time.time() > end:
            raise TimeoutError(what)
        time.sleep(0.5)


@pytest.mark.deployment
def test_a_killed_supernode_is_lost_for_a_round_and_rejoins_from_its_own_state(tmp_path):
    """Three SuperNodes, four rounds; one is killed (SIGKILL) during round 2. The round ends
    with the other two when Flower reports the node unavailable or after
    federation.round_timeout_s (90 s: a normal step here takes 40-60 s with three sites on two
    cores); the site restarts, is identified
    again, and continues from the state in its folder."""
    cfg = tiny_config(
        "train.num_threads=1",
        "federation.rounds=4",
        "finetune.epochs=0",
        "federation.round_timeout_s=90",
        "federation.min_fit_fraction=0.6",
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")
    with LoopbackSession(tmp_path / "flower") as fl:
        _, nodes = fl.start_sites(tmp_path, [c.name for c in cfg.data.clients])
        run_id = fl.run({"run-dir": str(run_dir.resolve())})
        _wait_for(lambda: _position(run_dir)[1] >= 1, 600, "round 1 did not finish")
        # Mid round 2 the site's machine goes down: the SuperNode and every process it started.
        for pid in [nodes["us"].pid, *_descendants([nodes["us"].pid])]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        fl.start_supernode("us-restarted", {"client-name": "us"})  # its supervisor restarts it
        run = fl.wait(run_id, timeout=1200, done_hint=summary_written(run_dir))
    assert run["status"] == "finished:completed"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(x["round"], x["client"]) for x in summary["lost"]] == [(2, "us")], summary["lost"]
    # Flower marks the node unavailable when its heartbeats stop, or the wait times out.
    assert (
        "unavailable" in summary["lost"][0]["reason"]
        or "round_timeout_s=90" in (summary["lost"][0]["reason"])
    )
    assert [(x["round"], x["client"]) for x in summary["transport"]["rejoined"]] == [(3, "us")]
    assert set(summary["clients"]) == {"mri", "us", "ct"}
    log = (tmp_path / "flower" / "logs" / "supernode-us-restarted.log").read_text()
    assert "site 'us' rejoins at step 3 from its state after step 1" in log
    rows = read_metrics(run_dir / "metrics.csv")
    # Step 2 would have validated round 1 (us has no row for it); us is back from step 3 on.
    assert [int(r["round"]) for r in rows if r["client"] == "us"] == [2, 3, 4]
    assert len([r for r in rows if r["client"] == "mri"]) == 4


@pytest.mark.deployment
def test_a_killed_server_resumes_to_the_uninterrupted_result(tmp_path):
    """The whole simulation (CLI, SuperLink, ServerApp) is killed after round 2 of 4;
    ``fedoap run --resume`` continues the server from its checkpoint and each site from its own
    folder, and ends where the uninterrupted run ends (in-process, which the simulation equals:
    test_simulation_equals_in_process)."""
    args = ("train.num_threads=1", "federation.rounds=4", "finetune.epochs=1")
    ref = quiet(tiny_config(*args), tmp_path / "reference")
    cfg_path = tmp_path / "cfg.yaml"
    save_config(tiny_config(*args, "federation.runtime=flower-sim"), cfg_path)
    run_dir = tmp_path / "killed"
    cli = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "fedoap"),
            "run",
            "-c",
            str(cfg_path),
            "-o",
            str(run_dir),
            "--quiet",
        ],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for(lambda: _position(run_dir)[1] >= 2, 900, "round 2 did not finish")
    pids = json.loads((run_dir / "flower" / "pids.json").read_text())
    for pid in [cli.pid, *pids]:  # the machine goes down: every process at once
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    cli.wait()
    assert not (run_dir / "summary.json").exists()
    stopped_at = _position(run_dir)
    assert stopped_at[0] == "federated" and stopped_at[1] < 4
    resumed = resume_experiment(run_dir, progress=False)
    assert resumed["flower"]["status"] == "finished:completed"
    _assert_same_run(ref, resumed, tmp_path / "reference", run_dir)


def test_the_clientapp_import_paths_stay_light():
    """Flower 1.42 starts a ClientApp process per message: every import is paid per message.
    The relay Flower starts on a deployment imports no PyTorch (the site worker has it); the
    in-process ClientApp (simulation, worker=false) imports no MONAI (5.5 s here), matplotlib or
    scipy: they load only where used (HD95 on the test split, plots at the end of a run,
    synthetic data)."""
    code = (
        "import sys, fedoap.federation.flower_client; "
        "print(sorted(m for m in ('torch', 'monai', 'matplotlib', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    code = (
        "import sys, fedoap.federation.flower_client, fedoap.federation.flower_site; "
        "print(sorted(m for m in ('monai', 'matplotlib', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_worker_wire_carries_headers_and_arrays_exactly():
    import socket

    import numpy as np

    from fedoap.federation.flower_client import recv_frame, send_frame

    a, b = socket.socketpair()
    arrays = {
        "shared.w": np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32),
        "kv.n": np.arange(7, dtype=np.int64),
    }
    with a, b:
        send_frame(a, {"kind": "train", "x": [1, None]}, arrays)
        send_frame(a, {"kind": "query"}, {})
        header, got = recv_frame(b)
        assert header == {"kind": "train", "x": [1, None]}
        assert got.keys() == arrays.keys()
        for k, v in arrays.items():
            assert got[k].dtype == v.dtype and np.array_equal(got[k], v)
        assert recv_frame(b) == ({"kind": "query"}, {})


def test_waiting_asks_the_superlink_only_once_the_run_has_written_its_summary(
    tmp_path, monkeypatch
):
    """Each status query is a ``flwr`` process of seconds of CPU: while the run has not written
    its summary, ``wait`` asks only every ``slow_poll`` seconds; once it has, every ``poll``."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    hint = summary_written(run_dir)
    assert not hint()
    fl = FlowerSession(tmp_path / "flower")
    calls = []

    def status(run_id):
        calls.append(time.time())
        if len(calls) == 3:  # the run writes its summary at the third query
            (run_dir / "summary.json").write_text("{}")
        return {"status": "finished:completed" if hint() else "running"}

    monkeypatch.setattr(fl, "status", status)
    start = time.time()
    # The summary appears only at the 3rd query: without the hint (a query every second) that
    # is 2 s in; with it, the 2nd query waits for slow_poll and the run never finishes in 3 s.
    with pytest.raises(TimeoutError):
        fl.wait("1", timeout=3, poll=1, done_hint=hint, slow_poll=30)
    assert len(calls) == 1 and calls[0] - start < 1
    # A summary that was already there (a resumed run's earlier one) is no hint; a rewrite is.
    (run_dir / "summary.json").write_text("{}")
    old = summary_written(run_dir)
    assert not old()
    os.utime(run_dir / "summary.json", ns=(0, time.time_ns() + 10**9))
    assert old()


def test_the_safeguard_on_flower_decides_as_in_process_and_its_model_stays_at_the_site(
    tmp_path, monkeypatch
):
    """safeguard.mode=choose on the Flower simulation: every site keeps what it keeps
    in-process, with the same test scores and per-case rows; its local-only model lives in the
    site's own folder, and nothing of it reaches the server."""
    monkeypatch.chdir(tmp_path)
    args = ("train.num_threads=1", "federation.rounds=1", "finetune.epochs=1")
    args += ("safeguard.mode=choose",)
    ref = quiet(tiny_config(*args), tmp_path / "inprocess")
    sim = quiet(tiny_config(*args, "federation.runtime=flower-sim"), Path("flower"))
    assert sim["flower"]["status"] == "finished:completed"
    for name, c in ref["clients"].items():
        assert sim["clients"][name]["safeguard"] == c["safeguard"]
        for m in ("dice", "case_dice"):
            assert sim["clients"][name]["test"][m] == pytest.approx(c["test"][m], abs=1e-9)
    assert sim["safeguard"] == ref["safeguard"]
    assert sim["time"]["safeguard_seconds"] > 0  # reported by the sites
    assert (tmp_path / "flower" / "test_cases.csv").read_text() == (
        tmp_path / "inprocess" / "test_cases.csv"
    ).read_text()
    server = load_tensors(tmp_path / "flower" / "checkpoints" / "last.safetensors")[0]
    assert not any("local/" in k for k in server)
    for name in ref["clients"]:
        steps = sorted((tmp_path / "flower" / "checkpoints" / "site" / name).glob("step-*"))
        assert any(k.startswith("local/") for k in load_tensors(steps[-1])[0])
    received = json.loads((tmp_path / "flower" / "flower_received_keys.json").read_text())
    assert all(k.startswith(("shared.", "kv.")) for keys in received for k in keys)
