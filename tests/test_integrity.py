"""No silent wrong results: divergence, tampered checkpoints, config bombs, unfinished runs.

Each test reproduces a fault that used to end in exit 0 with plausible numbers, in a traceback,
or in a runaway process, and checks that it now fails loudly: a one-line ``error:`` with exit
code 2 from the command line, naming the key, file or client at fault.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import struct
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import fedoap.api as api_mod
from fedoap.algorithms import ALGORITHMS
from fedoap.algorithms.base import Algorithm
from fedoap.api import evaluate_run, load_client_model, resume_experiment, run_experiment
from fedoap.cli.main import app
from fedoap.config import Config, ConfigError, load_config
from fedoap.data import DataError
from fedoap.errors import CheckpointError, DivergedError
from fedoap.federation.checkpoint import load_tensors, save_tensors
from fedoap.runs import RunDir, read_metrics
from tests.conftest import REPO, tiny_config

cli = CliRunner()


def fedoap(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``fedoap ARGS`` in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "fedoap.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def assert_one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit code 2, no traceback, and one ``error:`` line on stderr containing ``needles``."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def quiet(cfg: Config, path: Path) -> dict:
    return run_experiment(cfg, path, progress=False)


def write_cfg(path: Path, cfg: Config) -> Path:
    path.write_text(cfg.to_yaml())
    return path


ONE = ("federation.rounds=1", "finetune.epochs=0", "train.precision=fp32")


# ------------------------------------------------------------------ numeric ranges (item 7)


def _numeric_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = set(typing.get_args(tp)) or {tp}
        # One level further: tuple[float, float] | None is numeric too.
        nested = {b for a in args for b in typing.get_args(a)}
        if (args | nested) & {int, float}:
            out.append((prefix + f.name, f))
        inner = [a for a in args | {tp} if dataclasses.is_dataclass(a)]
        for a in inner:
            out += _numeric_fields(a, f"{prefix}{f.name}.")
        for a in typing.get_args(tp):  # tuple[ClientSpec, ...]
            if dataclasses.is_dataclass(a):
                out += _numeric_fields(a, f"{prefix}{f.name}[].")
    return out


def test_every_numeric_key_declares_its_range():
    keys = _numeric_fields(Config)
    assert len(keys) > 30  # the walk reaches the nested sections
    for name in ALGORITHMS.names():
        options = ALGORITHMS.get(name).Options
        keys += _numeric_fields(options, f"algorithm({name}).")
    missing = [k for k, f in keys if "range" not in f.metadata]
    assert not missing, f"numeric keys without a range (use config.ranged): {missing}"


def test_defaults_lie_in_their_ranges():
    load_config(None, ["data.clients=[{name: a, source: synthetic, style: mri}]"])
    for name in ALGORITHMS.names():
        ALGORITHMS.get(name)(tiny_config(f"method={name}"))  # checks its options' ranges


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.image_size=0", "data.image_size"),
        ("data.image_size=-32", "data.image_size"),
        ("train.weight_decay=-5", "train.weight_decay"),
        ("finetune.lr=-1", "finetune.lr"),
        ("train.lr=.inf", "train.lr"),
        ("train.lr=1e400", "train.lr"),
        ("seed=-1", "seed"),
        ("federation.rounds=0", "federation.rounds"),
        ("data.augment.rotate_deg=1e9", "data.augment.rotate_deg"),
        ("finetune.pbl.s=-.nan", "finetune.pbl.s"),
    ],
)
def test_out_of_range_values_fail_before_the_run_folder(tmp_path, override, key):
    cfg = write_cfg(tmp_path / "base.yaml", tiny_config(*ONE))
    out = tmp_path / "run"
    res = fedoap("run", "-c", str(cfg), "-o", str(out), "-q", override)
    assert_one_line_error(res, key)
    assert not out.exists()


def test_method_options_are_range_checked():
    from fedoap.algorithms import build_algorithm

    with pytest.raises(ConfigError, match=r"algorithm.mu: must be >= 0"):
        build_algorithm(tiny_config("method=fedprox", "algorithm.mu=-1"))


# ------------------------------------------------------------------ YAML bombs (item 4)


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    res = fedoap("config", "-c", str(bomb), timeout=60)  # it used to grow to 23 GB
    assert_one_line_error(res, str(bomb), "aliases")


def test_a_modest_anchor_still_works():
    from fedoap.config import load_yaml

    text = """
    common: &c {source: synthetic, style: mri, num_images: 12}
    clients:
      - {<<: *c, name: a}
      - {<<: *c, name: b, style: ct}
    """
    assert load_yaml(text, "anchors.yaml") == yaml.safe_load(text)


def test_recursive_alias_is_refused():
    from fedoap.config import load_yaml

    with pytest.raises(ConfigError, match="alias to itself"):
        load_yaml("a: &x [1, *x]\n", "loop.yaml")


def test_odd_yaml_keys_and_scalars_are_config_errors(tmp_path):
    for text in ("1: 2\n", "train: {lr: 2024-01-01}\n", "data: [1, 2]\n", "? [a]\n: 1\n"):
        p = tmp_path / "odd.yaml"
        p.write_text(text)
        with pytest.raises(ConfigError):
            load_config(p)


# ------------------------------------------------------------------ divergence (item 1)


def test_lr_that_diverges_stops_the_run_naming_client_round_and_step(tmp_path):
    cfg = tiny_config(*ONE, "train.lr=1e30")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, clients=cfg.data.clients[:1]))
    out = tmp_path / "run"
    res = fedoap("run", "-c", str(write_cfg(tmp_path / "c.yaml", cfg)), "-o", str(out), "-q")
    line = assert_one_line_error(res, "client 'mri'", "round 1", "step", "train.lr=1e+30")
    assert "diverged" in line
    assert not (out / "summary.json").exists()  # no plausible-looking results


def poison(client: str, rnd: int):
    """``Algorithm.fit`` that makes one client's upload non-finite in one round (as a method
    that diverges after the training loop would)."""
    fit = Algorithm.fit

    def poisoned(alg, model, global_arrays, state, data, ctx):
        update, new = fit(alg, model, global_arrays, state, data, ctx)
        if ctx.client == client and ctx.round == rnd:
            key = next(iter(update.arrays))
            update.arrays[key] = torch.full_like(update.arrays[key], math.nan)
        return update, new

    return poisoned


def test_diverged_client_stops_the_run_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr(Algorithm, "fit", poison("us", 2))
    with pytest.raises(DivergedError, match=r"client 'us', round 2 \(fit\).*upload"):
        quiet(tiny_config("method=fedavg", "finetune.epochs=0"), tmp_path / "run")
    rd = RunDir(tmp_path / "run")
    assert not rd.summary.exists()
    _, meta = load_tensors(rd.last)  # the last checkpoint is intact: round 1
    assert meta["position"] == {"stage": "federated", "done": 1}


def test_diverged_client_is_excluded_and_reported_when_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(Algorithm, "fit", poison("us", 2))
    cfg = tiny_config("method=fedavg", "federation.rounds=3", "train.on_divergence=exclude")
    summary = quiet(cfg, tmp_path / "run")
    assert set(summary["clients"]) == {"mri", "ct"}
    why = summary["excluded"]["us"]
    assert (why["round"], why["stage"]) == (2, "fit") and "not finite" in why["reason"]
    dice = [c["test"]["dice"] for c in summary["clients"].values()]
    assert summary["mean"]["test"]["dice"] == pytest.approx(sum(dice) / 2)
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert max(int(r["round"]) for r in rows if r["client"] == "us") == 1
    assert max(int(r["round"]) for r in rows if r["client"] == "mri") == 3
    assert not (tmp_path / "run" / "checkpoints" / "best" / "us.safetensors").exists()
    # Resume keeps the exclusion (it is part of the checkpoint).
    _, meta = load_tensors(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert meta["excluded"]["us"]["round"] == 2
    assert set(meta["excluded"]) == {"us"}
    # Re-scoring skips it (and says so); asking for its model is a clear error.
    monkeypatch.undo()
    scored = evaluate_run(tmp_path / "run", "test")
    assert set(scored["clients"]) == {"mri", "ct"} and scored["excluded"]["us"]["round"] == 2
    for name in ("mri", "ct"):
        assert scored["clients"][name]["dice"] == pytest.approx(
            summary["clients"][name]["test"]["dice"]
        )
    with pytest.raises(ConfigError, match="'us' was excluded .* diverged in round 2"):
        load_client_model(tmp_path / "run", "us")


def test_a_non_finite_aggregate_always_stops_the_run(tmp_path, monkeypatch):
    aggregate = Algorithm.aggregate

    def nan_server_step(alg, global_arrays, updates, server, policy):
        new = aggregate(alg, global_arrays, updates, server, policy)
        key = next(k for k, v in new.items() if v.is_floating_point())
        return {**new, key: torch.full_like(new[key], math.inf)}

    monkeypatch.setattr(Algorithm, "aggregate", nan_server_step)
    cfg = tiny_config("method=fedavg", "finetune.epochs=0", "train.on_divergence=exclude")
    with pytest.raises(DivergedError, match="round 1: the aggregated global model is not finite"):
        quiet(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "summary.json").exists()


def test_exclude_is_refused_where_it_cannot_work():
    with pytest.raises(ConfigError, match="on_divergence=exclude"):
        tiny_config("train.on_divergence=exclude", "federation.runtime=flower-sim")


def test_a_benchmark_never_drops_a_client():
    from fedoap.bench import derive

    with pytest.raises(ConfigError, match="cannot be used in a benchmark"):
        derive(tiny_config(), ["train.on_divergence=exclude"])


def test_non_finite_loss_is_found_at_its_step():
    from fedoap.training.engine import train_epochs

    model = torch.nn.Conv2d(1, 1, 3, padding=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 1, 8, 8)
    split = type("S", (), {"x": x, "y": (x > 0).float(), "__len__": lambda self: 8})()
    calls = []

    def loss_fn(logits, y, gen, xb):
        calls.append(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        return loss * (math.inf if len(calls) == 3 else 1.0)

    gen = torch.Generator().manual_seed(0)
    with pytest.raises(DivergedError, match="step 3 of 4") as info:
        train_epochs(model, opt, split, 1, loss_fn, gen, 2, "fp32")  # type: ignore[arg-type]
    assert info.value.step == 3


def test_digest_of_old_runs_is_unchanged():
    # on_divergence joined the config after runs existed: at its default it leaves the run's
    # identity (and so resume of earlier runs) unchanged.
    # (train.precision was bf16 by default then; auto resolves to it where bf16 is native.)
    import torch

    from fedoap.training.device import auto_precision, resolve_precision

    f4 = REPO / "configs" / "federation4.yaml"
    assert load_config(f4, ["train.precision=bf16"]).digest() == "bd1bf95c60e4"
    if auto_precision(torch.device("cpu")) == "bf16":
        assert resolve_precision(load_config(f4, ["train.device=cpu"])).digest() == "bd1bf95c60e4"
    changed = load_config(f4, ["train.precision=bf16", "train.on_divergence=exclude"])
    assert changed.digest() != "bd1bf95c60e4"
    # privacy.dp.unit joined after the privacy benchmark ran: its cells keep their keys.
    from fedoap.bench import digest

    cell = REPO / "benchmarks/results/privacy/cells/eps-1-fedoap-seed0-3e7d01a92731"
    dp = load_config(cell / "config.yaml")
    assert dp.privacy.dp.enabled and digest(dp) == "3e7d01a92731"
    by_case = load_config(cell / "config.yaml", ["privacy.dp.unit=case"])
    assert digest(by_case) != "3e7d01a92731"


# ------------------------------------------------------------------ checkpoints (items 2 and 9)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("integrity") / "run"
    quiet(tiny_config(*ONE), path)
    return path


def flip_bits_in_tensor(path: Path, key: str | None = None) -> str:
    """Flip one byte inside a tensor's data (not the header) of a safetensors file."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    key = key or max(
        header, key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0]
    )
    start, end = header[key]["data_offsets"]
    raw[8 + n + (start + end) // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    return key


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tampered_last_checkpoint_is_refused_on_resume(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    (run / "summary.json").unlink()  # an unfinished run, so resume reads the checkpoint
    flip_bits_in_tensor(run / "checkpoints" / "last.safetensors")
    res = fedoap("run", "--resume", str(run), "-q")
    assert_one_line_error(res, "last.safetensors", "digest")
    assert not (run / "summary.json").exists()


@pytest.mark.parametrize("command", ["evaluate", "predict", "adapt"])
def test_tampered_best_checkpoint_is_refused_by_every_reader(finished_run, tmp_path, command):
    run = copy_run(finished_run, tmp_path / "run")
    if command == "adapt":  # adapt starts from the federation's final state
        target = run / "checkpoints" / "last.safetensors"
    else:
        target = run / "checkpoints" / "best" / "mri.safetensors"
    flip_bits_in_tensor(target)
    img = tmp_path / "x.png"
    Image.new("L", (20, 20), 90).save(img)
    npz = tmp_path / "new.npz"
    rng = np.random.default_rng(0)
    np.savez(
        npz,
        images=rng.integers(0, 255, (24, 32, 32), dtype=np.uint8),
        masks=(rng.random((24, 32, 32)) > 0.7).astype(np.uint8),
        case_ids=np.array([f"p{i // 2}" for i in range(24)]),
    )
    args = {
        "evaluate": ["evaluate", str(run)],
        "predict": ["predict", str(run), "--client", "mri", str(img), "-o", str(tmp_path / "p")],
        "adapt": [
            "adapt",
            str(run),
            "--data",
            str(npz),
            "--name",
            "new",
            "-o",
            str(tmp_path / "a"),
        ],
    }[command]
    res = fedoap(*args)
    assert_one_line_error(res, target.name, "digest")
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


def test_checkpoint_without_digest_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    save_tensors(path, {"w": torch.ones(3)}, {"a": 1})
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={"fedoap": json.dumps({"a": 1})})  # digest stripped
    with pytest.raises(CheckpointError, match="no digest"):
        load_tensors(path)


def test_digest_covers_the_metadata(tmp_path):
    path = tmp_path / "x.safetensors"
    save_tensors(path, {"w": torch.ones(3)}, {"position": {"stage": "federated", "done": 1}})
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        metadata = dict(fh.metadata())
    metadata["fedoap"] = metadata["fedoap"].replace('"done": 1', '"done": 0')
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="does not match its digest"):
        load_tensors(path)


def test_checkpoint_metadata_without_position_is_a_clear_error(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    (run / "summary.json").unlink()
    last = run / "checkpoints" / "last.safetensors"
    tensors, meta = load_tensors(last)
    del meta["position"]
    save_tensors(last, tensors, meta)  # a valid digest over bad metadata
    res = fedoap("run", "--resume", str(run), "-q")
    assert_one_line_error(res, "last.safetensors", "position")


# ------------------------------------------------------------------ unfinished runs (item 10)


class Killed(BaseException):
    """Stands in for kill -9 at a chosen moment (nothing after it runs)."""


def test_run_is_complete_only_when_every_output_is_written(tmp_path, monkeypatch):
    def killed_while_plotting(*args, **kwargs):
        raise Killed

    cfg = tiny_config(*ONE)
    import fedoap.plots

    monkeypatch.setattr(fedoap.plots, "plot_curves", killed_while_plotting)
    with pytest.raises(Killed):
        quiet(cfg, tmp_path / "run")
    rd = RunDir(tmp_path / "run")
    assert rd.metrics.exists() and not rd.summary.exists() and not rd.is_complete()
    (tmp_path / "run" / "metrics.csv.tmp").write_text("torn")  # as a kill mid-write leaves
    monkeypatch.undo()
    summary = resume_experiment(rd.root, progress=False)
    assert rd.is_complete() and (rd.plots / "val_dice.png").is_file()
    assert json.loads(rd.summary.read_text()) == summary
    assert not list(rd.root.rglob("*.tmp"))


# ------------------------------------------------------------------ error types (item 12)


def run_raising(tmp_path, monkeypatch, exc: BaseException):
    """``fedoap run`` (in-process) whose experiment raises ``exc``."""

    def raising(*args, **kwargs):
        raise exc

    monkeypatch.setattr(api_mod, "run_experiment", raising)
    cfg = write_cfg(tmp_path / "c.yaml", tiny_config(*ONE))
    return cli.invoke(app, ["run", "-c", str(cfg), "-o", str(tmp_path / "run"), "-q"])


@pytest.mark.parametrize("bug", [ValueError("a bug"), KeyError("a bug"), TypeError("a bug")])
def test_a_genuine_bug_keeps_its_traceback(tmp_path, monkeypatch, bug):
    res = run_raising(tmp_path, monkeypatch, bug)
    assert res.exception is bug  # not turned into "error: ..." with exit code 2
    assert res.exit_code == 1


@pytest.mark.parametrize(
    "err",
    [
        DataError("x.npz: bad"),
        CheckpointError("y: bad"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
)
def test_user_and_machine_errors_are_one_line(tmp_path, monkeypatch, err):
    res = run_raising(tmp_path, monkeypatch, err)
    assert res.exit_code == 2 and "error:" in res.output
    assert res.output.count("\n") == 1
