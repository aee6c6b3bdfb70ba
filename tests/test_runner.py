"""End-to-end runs of the in-process runner on tiny synthetic federations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import fedoap.federation.server as server_mod
import fedoap.federation.site as site_mod
from fedoap.api import evaluate_run, predict_images, resume_experiment, run_experiment
from fedoap.runs import RunExistsError, read_metrics
from tests.conftest import results_of, tiny_config


def quiet_run(cfg, path: Path):
    return run_experiment(cfg, path, progress=False)


@pytest.fixture(scope="module")
def fedoap_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "fedoap"
    return path, quiet_run(tiny_config(), path)


def test_run_folder_layout_and_summary(fedoap_run):
    path, summary = fedoap_run
    for rel in (
        "config.yaml",
        "metrics.csv",
        "summary.json",
        "splits.json",
        "checkpoints/last.safetensors",
        "plots/val_dice.png",
    ):
        assert (path / rel).is_file(), rel
    for name in ("mri", "us", "ct"):
        assert (path / "checkpoints" / "best" / f"{name}.safetensors").is_file()
        test = summary["clients"][name]["test"]
        assert set(test) >= {"dice", "iou", "hd95_px", "case_dice"}
        assert 0 <= test["dice"] <= 1
        assert summary["clients"][name]["best_round"] >= 1
    assert summary["method"] == "fedoap"
    assert summary["params"]["shared"] > 0 and summary["params"]["personal"] > 0
    assert summary["comm"]["bytes_up_per_round"] == summary["comm"]["bytes_down_per_round"] > 0
    assert summary["time"]["seconds_total"] > 0 and summary["time"]["seconds_per_round"] > 0
    mean = sum(c["test"]["dice"] for c in summary["clients"].values()) / 3
    assert abs(summary["mean"]["test"]["dice"] - mean) < 1e-9
    assert json.loads((path / "summary.json").read_text()) == summary


def test_comm_counts_only_shared_weights(fedoap_run):
    path, summary = fedoap_run
    # bytes up per client-round = 4 bytes x number of shared tensors' elements (fp32, no buffers
    # with instance norm)
    assert summary["comm"]["bytes_up_per_round"] == 4 * summary["params"]["shared"]


def test_metrics_rows_and_selection_on_validation(fedoap_run):
    path, summary = fedoap_run
    rows = read_metrics(path / "metrics.csv")
    cfg = tiny_config()
    assert len(rows) == 3 * (cfg.federation.rounds + cfg.finetune.epochs)
    assert cfg.train.select_metric == "case_dice"  # the default
    for name, c in summary["clients"].items():
        mine = [r for r in rows if r["client"] == name]
        best = max(mine, key=lambda r: (float(r["val_case_dice"]), -int(r["round"])))
        assert int(best["round"]) == c["best_round"]
        assert abs(float(best["val_case_dice"]) - c["val"]["case_dice"]) < 1e-5
    assert {r["stage"] for r in rows} == {"federated", "finetune"}


@pytest.mark.parametrize(
    "overrides, n_val, n_alphas",
    [
        ((), 3 * (2 + 1), 0),
        # The safeguard's local model is validated as often again; then at each site its 5
        # blends of the two, and its test.
        (("safeguard.mode=interpolate",), 3 * (2 + 1) * 2, 5),
    ],
)
def test_test_split_is_read_once_at_the_end(tmp_path, monkeypatch, overrides, n_val, n_alphas):
    seen = []
    real = site_mod.evaluate

    def spy(model, data, precision, full=False, batch_size=256, cases=False):
        seen.append("test" if full else "val")
        return real(model, data, precision, full, batch_size, cases)

    monkeypatch.setattr(site_mod, "evaluate", spy)
    quiet_run(tiny_config(*overrides), tmp_path / "r")
    assert seen == ["val"] * n_val + (["val"] * n_alphas + ["test"]) * 3


def test_evaluate_reproduces_the_summary(fedoap_run):
    path, summary = fedoap_run
    out = evaluate_run(path)
    for name, c in summary["clients"].items():
        assert out["clients"][name]["dice"] == pytest.approx(c["test"]["dice"], abs=1e-9)
        assert out["clients"][name]["case_dice"] == pytest.approx(c["test"]["case_dice"], abs=1e-9)


def test_predict_writes_masks_and_overlays(fedoap_run, tmp_path):
    path, _ = fedoap_run
    img = tmp_path / "scan.png"
    Image.new("L", (50, 40), 90).save(img)
    ((mask, over),) = predict_images(path, "mri", [img], tmp_path / "out")
    m = Image.open(mask)
    assert m.size == (50, 40) and m.mode == "L"
    assert Image.open(over).size == (50, 40) and Image.open(over).mode == "RGB"


def test_refuses_to_overwrite_and_force_moves_aside(fedoap_run, tmp_path):
    path = tmp_path / "r"
    path.mkdir()
    (path / "precious.txt").write_text("keep me")
    with pytest.raises(RunExistsError, match="already exists"):
        quiet_run(tiny_config(), path)
    assert (path / "precious.txt").read_text() == "keep me"
    run_experiment(
        tiny_config("federation.rounds=1", "finetune.epochs=0"),
        path,
        force=True,
        progress=False,
    )
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("r.old-")]
    assert len(moved) == 1 and (moved[0] / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("method", ["fedavg", "local"])
def test_baselines_run(tmp_path, method):
    s = quiet_run(tiny_config(f"method={method}", "federation.rounds=1"), tmp_path / method)
    assert s["method"] == method
    if method == "local":
        assert s["comm"]["bytes_up_per_round"] == 0 and s["params"]["shared"] == 0
        assert s["time"]["finetune_epochs"] == 1  # same budget as FedOAP
    else:
        assert s["params"]["personal"] == 0 and s["time"]["finetune_epochs"] == 0


def test_client_sampling_fraction(tmp_path):
    s = quiet_run(
        tiny_config("federation.fraction=0.34", "federation.rounds=3", "finetune.epochs=0"),
        tmp_path / "f",
    )
    rows = read_metrics(tmp_path / "f" / "metrics.csv")
    per_round = {}
    for r in rows:
        per_round.setdefault(r["round"], 0)
        per_round[r["round"]] += int(r["sampled"])
    assert set(per_round.values()) == {1}
    assert len(rows) == 9  # every client is validated every round
    assert s["comm"]["bytes_total"] == 3 * 2 * s["comm"]["bytes_up_per_round"]


def test_fp32_and_bf16_both_train(tmp_path):
    from fedoap.runs import read_metrics

    first = {}
    for prec in ("fp32", "bf16"):
        s = quiet_run(
            tiny_config(f"train.precision={prec}", "federation.rounds=3", "finetune.epochs=0"),
            tmp_path / prec,
        )
        assert s["execution"]["precision"] == prec
        rows = [r for r in read_metrics(tmp_path / prec / "metrics.csv") if r["train_loss"]]
        loss = {
            k: np.mean([float(r["train_loss"]) for r in rows if r["round"] == str(k)])
            for k in (1, 3)
        }
        assert loss[3] < loss[1] - 0.01, (prec, loss)  # it learns
        first[prec] = loss[1]
    # the same first round, up to bf16's rounding
    assert first["bf16"] == pytest.approx(first["fp32"], rel=0.05)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.cuda,
                pytest.mark.skipif(
                    not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"
                ),
            ],
        ),
    ],
)
def test_resume_after_kill_equals_uninterrupted_run(tmp_path, device):
    """Kill a real ``fedoap run`` process after its second round, resume, compare summaries.
    On CUDA with ``train.deterministic`` (cuDNN autotuning would pick other kernels)."""
    # Float reductions depend on the intra-op thread count, so pin it: the killed process and
    # this one must agree even if an earlier test changed this process's torch setting.
    cfg = tiny_config(
        "federation.rounds=4",
        "finetune.epochs=2",
        "model.kv.mode=bank",
        "train.num_threads=1",
        f"train.device={device}",
        f"train.deterministic={str(device == 'cuda').lower()}",
    )
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    reference = quiet_run(cfg, tmp_path / "reference")

    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedoap.cli.main",
            "run",
            "-c",
            str(cfg_path),
            "-o",
            str(run_dir),
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    metrics = run_dir / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.is_file() and len(read_metrics(metrics)) >= 2 * 3:  # two rounds x three clients
            break
        if proc.poll() is not None:
            pytest.fail(
                f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
            )
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists(), "the run finished before the kill"
    done = len(read_metrics(metrics))
    assert 6 <= done < 3 * 6

    resumed = resume_experiment(run_dir, progress=False)
    assert results_of(resumed) == results_of(reference)
    rows = read_metrics(metrics)
    assert len(rows) == 3 * 6
    ref_rows = read_metrics(tmp_path / "reference" / "metrics.csv")
    assert [(r["round"], r["client"], r["val_dice"]) for r in rows] == [
        (r["round"], r["client"], r["val_dice"]) for r in ref_rows
    ]


def test_resume_refuses_a_different_config(fedoap_run):
    path, _ = fedoap_run
    from fedoap.config import ConfigError

    with pytest.raises(ConfigError, match="differs from"):
        resume_experiment(path, tiny_config("seed=5"), progress=False)


def test_run_restores_the_thread_count(tmp_path):
    """``train.num_threads`` applies to the run only; the process's setting is restored after."""
    import torch

    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    quiet_run(tiny_config("federation.rounds=1", f"train.num_threads={target}"), tmp_path / "r")
    assert torch.get_num_threads() == before


def test_checkpoint_every_k_rounds_still_resumes_exactly(tmp_path, monkeypatch):
    """``federation.checkpoint_every=2``: fewer resume checkpoints (the costly write at paper
    scale), and a run that dies after a round without one resumes from the one before it and
    ends exactly as an uninterrupted run."""
    import fedoap.federation.state as state_mod

    over = ("federation.rounds=4", "finetune.epochs=1", "train.num_threads=1")
    reference = quiet_run(tiny_config(*over), tmp_path / "reference")

    writes: list[str] = []
    real_save = state_mod.save_tensors

    def counting(path, tensors, meta=None):
        if path.name == "last.safetensors":
            writes.append(f"{meta['position']['stage']}:{meta['position']['done']}")
        return real_save(path, tensors, meta)

    monkeypatch.setattr(state_mod, "save_tensors", counting)
    cfg = tiny_config(*over, "federation.checkpoint_every=2")
    assert cfg.digest() == tiny_config(*over).digest()  # an execution setting
    real_round = server_mod.Server._federated_step

    def dies_in_round_4(self, rnd):
        if rnd == 4:
            raise KeyboardInterrupt("killed")
        return real_round(self, rnd)

    monkeypatch.setattr(server_mod.Server, "_federated_step", dies_in_round_4)
    with pytest.raises(KeyboardInterrupt):
        quiet_run(cfg, tmp_path / "killed")
    assert writes == ["federated:2"]  # round 3 was trained but not saved
    monkeypatch.setattr(server_mod.Server, "_federated_step", real_round)
    resumed = resume_experiment(tmp_path / "killed", progress=False)
    # Resumed from round 2: rounds 3 and 4 again, then the stage change and the last epoch.
    assert writes == ["federated:2", "finetune:0", "finetune:1"]
    assert results_of(resumed) == results_of(reference)


def test_the_test_scores_of_every_case_are_written(fedoap_run):
    import csv

    from fedoap.metrics import CASE_FIELDS

    path, summary = fedoap_run
    with open(path / "test_cases.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == CASE_FIELDS
        rows = list(reader)
    for name, c in summary["clients"].items():
        mine = [r for r in rows if r["client"] == name]
        assert len(mine) == c["n_cases"]["test"] == c["test"]["n_cases"]
        assert sum(int(r["slices"]) for r in mine) == c["n"]["test"]
        mean = sum(float(r["case_dice"]) for r in mine) / len(mine)
        assert mean == pytest.approx(c["test"]["case_dice"], abs=1e-5)  # csv keeps 6 digits
        assert "cases" not in c["test"]  # they live in the csv, not in summary.json


def test_fine_tuning_stops_at_each_site_after_patience_epochs_without_progress(tmp_path):
    """finetune.patience=1: a site fine-tunes epoch e only if epoch e-1 (or, for e = 1, round R)
    improved its validation score; the others keep going, and selection is unchanged."""
    rounds, epochs = 2, 5
    args = (f"federation.rounds={rounds}", f"finetune.epochs={epochs}", "train.num_threads=1")
    full = quiet_run(tiny_config(*args), tmp_path / "full")
    early = quiet_run(tiny_config(*args, "finetune.patience=1"), tmp_path / "early")
    rows = read_metrics(tmp_path / "early" / "metrics.csv")
    full_rows = read_metrics(tmp_path / "full" / "metrics.csv")
    stopped = 0
    for name in full["clients"]:
        mine = [r for r in full_rows if r["client"] == name]
        last_best, expected = rounds, []  # the epochs patience lets run, from the full run
        for e in range(1, epochs + 1):
            if (rounds + e - 1) - last_best >= 1:
                break
            expected.append(rounds + e)
            row = next(r for r in mine if int(r["round"]) == rounds + e)
            if row["best"] == "1":
                last_best = rounds + e
        got = [int(r["round"]) for r in rows if r["client"] == name and r["stage"] == "finetune"]
        assert got == expected
        stopped += len(expected) < epochs
        # Its selected model comes from the epochs it ran.
        assert early["clients"][name]["best_round"] <= max(expected, default=rounds)
    assert stopped >= 1, "no site stopped early: the test shows nothing"
