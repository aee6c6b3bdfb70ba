"""Tracking through the real libraries: after a run, its metrics are read back with MLflow's
client API and TensorBoard's event reader and compared with ``metrics.csv`` and
``summary.json``; a resumed run reports to the run it started, without repeating a row."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fedoap.api import resume_experiment, run_experiment
from fedoap.config import ConfigError
from fedoap.runs import read_metrics
from fedoap.tracking import STATE_FILE, metric_key
from fedoap.tracking.core import TRACKED
from tests.conftest import tiny_config

needs_mlflow = pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None, reason="needs the [tracking] extra (mlflow)"
)
needs_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None,
    reason="needs the [tracking] extra (tensorboard)",
)

RUN = ("federation.rounds=2", "finetune.epochs=1")


def expected_curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv as (step, value) per tracked key, as the file writes the values."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in read_metrics(run / "metrics.csv"):
        prefix = "" if row["stage"] in ("federated", "finetune") else f"{row['stage']}_"
        for col in TRACKED:
            if row[col] != "":
                key = f"{prefix}{col}/{metric_key(row['client'])}"
                out.setdefault(key, []).append((int(row["round"]), float(row[col])))
    return out


def mlflow_run(uri: str, experiment: str = "fedoap"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return client, runs


def mlflow_curves(client, run_id: str, keys) -> dict[str, list[tuple[int, float]]]:
    return {
        k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys
    }


@needs_mlflow
def test_mlflow_holds_every_metric_of_metrics_csv_exactly(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    cfg = tiny_config(*RUN, "tracking.backend=mlflow", f"tracking.uri={uri}")
    summary = run_experiment(cfg, tmp_path / "run", progress=False)

    client, runs = mlflow_run(uri)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    want = expected_curves(tmp_path / "run")
    assert len(want) == 3 * len(TRACKED)  # three clients
    assert mlflow_curves(client, run.info.run_id, want) == {k: sorted(v) for k, v in want.items()}
    # the test table, per client and for the mean
    for name, c in summary["clients"].items():
        assert run.data.metrics[f"test_dice/{name}"] == c["test"]["dice"]
        assert run.data.metrics[f"test_case_dice/{name}"] == c["test"]["case_dice"]
    assert run.data.metrics["test_dice/mean"] == summary["mean"]["test"]["dice"]
    # the config as parameters, and the tags
    assert run.data.params["federation.rounds"] == "2"
    assert run.data.params["method"] == cfg.method
    tags = run.data.tags
    assert tags["method"] == cfg.method and tags["seed"] == str(cfg.seed)
    assert tags["config_digest"] == summary["config_digest"]
    assert tags["device"] == summary["execution"]["name"]
    # the run folder's files
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "metrics.csv", "test_cases.csv", "config.yaml", "plots"} <= names


@needs_mlflow
def test_a_resumed_run_reports_to_the_same_mlflow_run_without_repeating_a_row(tmp_path):
    cfg = tiny_config("federation.rounds=3", "finetune.epochs=0", "tracking.backend=mlflow")
    run_dir = tmp_path / "run"
    run_experiment(cfg, run_dir, progress=False)
    # A run killed after its first round: its checkpoint, metrics and tracking state of then.
    (state,) = json.loads((run_dir / STATE_FILE).read_text())["runs"]
    uri = state["uri"]
    assert uri == f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"  # the default store
    client, runs = mlflow_run(uri)
    first = runs[0].info.run_id
    whole = mlflow_curves(client, first, expected_curves(run_dir))

    cfg1 = tiny_config("federation.rounds=3", "finetune.epochs=0", "tracking.backend=mlflow")
    killed = tmp_path / "killed"
    _run_then_stop_after_round(cfg1, killed, stop_after=1)
    assert (killed / "summary.json").exists() is False
    resume_experiment(killed, progress=False)
    client, runs = mlflow_run(f"sqlite:///{(killed / 'mlflow.db').resolve()}")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    got = mlflow_curves(client, runs[0].info.run_id, whole)
    # every step once, as the resumed run's metrics.csv has it, and the uninterrupted run's values
    assert got == {k: sorted(v) for k, v in expected_curves(killed).items()}
    assert got == whole


def _run_then_stop_after_round(cfg, run_dir: Path, stop_after: int) -> None:
    """Run until the server has checkpointed round ``stop_after``, then stop as a kill would."""
    from fedoap.federation.server import Server

    original = Server.checkpoint

    class Killed(Exception):
        pass

    def checkpoint(self, tensors=True):
        original(self, tensors)
        if self.stage == "federated" and self.done == stop_after and tensors:
            raise Killed

    Server.checkpoint = checkpoint
    try:
        with pytest.raises(Killed):
            run_experiment(cfg, run_dir, progress=False)
    finally:
        Server.checkpoint = original


@needs_tensorboard
def test_tensorboard_event_files_hold_every_metric_of_metrics_csv(tmp_path):
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(*RUN, "tracking.backend=tensorboard")
    summary = run_experiment(cfg, tmp_path / "run", progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    want = expected_curves(tmp_path / "run")
    for key, curve in want.items():
        got = sorted((e.step, e.value) for e in events.Scalars(key))
        # event files store float32
        assert got == sorted((s, float(np.float32(v))) for s, v in curve), key
    for name, c in summary["clients"].items():
        (last,) = events.Scalars(f"test_dice/{name}")
        assert last.value == float(np.float32(c["test"]["dice"]))
    assert "config/text_summary" in events.Tags()["tensors"]


def test_a_backend_that_is_not_installed_fails_before_any_work(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    cfg = tiny_config("tracking.backend=mlflow")
    with pytest.raises(ConfigError, match=r"tracking.backend=mlflow: .*fedoap\[tracking\]"):
        run_experiment(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_tracking_is_no_part_of_a_runs_identity():
    plain = tiny_config()
    tracked = tiny_config("tracking.backend=mlflow", "tracking.uri=http://host:5000")
    assert plain.digest() == tracked.digest()
    with pytest.raises(ConfigError, match="tracking.uri: only used with"):
        tiny_config("tracking.uri=http://host:5000")


@needs_mlflow
def test_a_benchmark_is_one_mlflow_run_with_a_nested_run_per_cell(tmp_path):
    import yaml

    from fedoap.bench import load_spec, plan, run_bench
    from fedoap.config import TrackingConfig

    base = tiny_config("federation.rounds=1", "finetune.epochs=1").to_dict()
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        yaml.safe_dump({"base": "base.yaml", "methods": ["fedavg", "local"], "seeds": [0, 1]})
    )
    spec, bases = load_spec(spec_file)
    cells = plan(spec, bases)
    out = tmp_path / "study"
    run_bench(spec, bases, out, cells[:1], jobs=1)  # one cell finished before tracking was on
    run_bench(spec, bases, out, cells, jobs=2, tracking=TrackingConfig(backend="mlflow"))

    client, runs = mlflow_run(f"sqlite:///{(out / 'mlflow.db').resolve()}", experiment="study")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.run_name == "study" and parent.info.status == "FINISHED"
    children = {r.info.run_name: r for r in runs if r is not parent}
    assert set(children) == {c.key for c in cells}  # the earlier cell too, from its folder
    for c in cells:
        run = children[c.key]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        assert run.data.tags["method"] == c.cfg.method
        want = expected_curves(out / "cells" / c.key / "run")
        assert mlflow_curves(client, run.info.run_id, want) == {
            k: sorted(v) for k, v in want.items()
        }
    # Run again, after reporting to TensorBoard too: nothing is sent twice to either store.
    run_bench(spec, bases, out, cells, jobs=1, tracking=TrackingConfig(backend="tensorboard"))
    assert {p.name for p in (out / "tensorboard").iterdir()} == {c.key for c in cells}
    run_bench(spec, bases, out, cells, jobs=1, tracking=TrackingConfig(backend="mlflow"))
    assert len(mlflow_run(f"sqlite:///{(out / 'mlflow.db').resolve()}", "study")[1]) == 5


@needs_mlflow
def test_a_flower_site_tracks_its_own_metrics_to_its_own_store(tmp_path):
    """A site's node config names its own store; its steps' rows and its test scores go there,
    as its own metrics.csv has them."""
    pytest.importorskip("flwr")
    from fedoap.algorithms import build_algorithm
    from fedoap.federation.flower_site import run_step
    from fedoap.federation.site import Step

    cfg = tiny_config("federation.rounds=2", "finetune.epochs=0", "train.num_threads=1")
    name = cfg.data.clients[0].name
    uri = f"sqlite:///{tmp_path / 'site-store.db'}"
    nc = {"client-name": name, "tracking-backend": "mlflow", "tracking-uri": uri}
    alg = build_algorithm(cfg)
    global_arrays = alg.init_global(alg.build_model())
    steps = [
        Step(1, "federated", fit=True),
        Step(2, "federated", validate=True, fit=True),
        Step(3, "test", validate=True),
    ]
    for step in steps:
        config = {
            "fedoap-config": cfg.to_yaml(),
            "run-dir": str(tmp_path / "run"),
            "step": json.dumps(step.__dict__),
        }
        result, _ = run_step(nc, config, global_arrays, 0.0)
    own = tmp_path / "run" / "sites" / name
    client, runs = mlflow_run(uri)
    (run,) = runs
    assert run.info.run_name == name and run.info.status == "FINISHED"
    want = expected_curves(own)
    assert want  # the site validated two rounds
    assert mlflow_curves(client, run.info.run_id, want) == {k: sorted(v) for k, v in want.items()}
    assert run.data.metrics[f"test_dice/{name}"] == result["test"]["test"]["dice"]


@needs_mlflow
@pytest.mark.flower
def test_the_flower_server_tracks_its_view_of_every_site(tmp_path, monkeypatch):
    """On Flower's simulation the ServerApp tracks what it receives: every site's rows, as
    the server's metrics.csv holds them, and the test table."""
    pytest.importorskip("flwr")
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(
        "federation.rounds=1",
        "finetune.epochs=1",
        "train.num_threads=1",
        "federation.runtime=flower-sim",
        "tracking.backend=mlflow",
    )
    summary = run_experiment(cfg, tmp_path / "run", progress=False)
    client, runs = mlflow_run(f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}")
    (run,) = runs
    assert run.info.status == "FINISHED"
    want = expected_curves(tmp_path / "run")
    assert len(want) == 3 * len(TRACKED)
    assert mlflow_curves(client, run.info.run_id, want) == {k: sorted(v) for k, v in want.items()}
    for name, c in summary["clients"].items():
        assert run.data.metrics[f"test_dice/{name}"] == c["test"]["dice"]


@needs_mlflow
def test_a_store_out_of_reach_leaves_the_run_untracked_with_one_warning(
    tmp_path, caplog, monkeypatch
):
    import logging

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = tiny_config(
        "federation.rounds=1",
        "finetune.epochs=0",
        "tracking.backend=mlflow",
        "tracking.uri=http://127.0.0.1:9",  # nothing listens on the discard port
    )
    with caplog.at_level(logging.WARNING, logger="fedoap.tracking.core"):
        summary = run_experiment(cfg, tmp_path / "run", progress=False)
    assert summary["clients"]  # the run completed
    warnings = [r for r in caplog.records if r.name == "fedoap.tracking.core"]
    assert len(warnings) == 1 and "tracking to http://127.0.0.1:9" in warnings[0].message
