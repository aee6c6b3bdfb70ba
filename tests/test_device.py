"""Device, precision and compilation (fedoap.training.device), tested on the CPU.

CI has no GPU: the device logic runs here through ``train.device=cpu`` and a faked CUDA
inventory; tests that need a real GPU are marked ``cuda`` and skipped, visibly, without one.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os

import pytest
import torch

from fedoap.aggregation import build_aggregation, weighted_mean
from fedoap.algorithms import build_algorithm
from fedoap.algorithms.base import FitContext
from fedoap.api import run_experiment
from fedoap.config import ConfigError, TrainConfig
from fedoap.data import prepare_clients
from fedoap.data.dataset import Split
from fedoap.federation.boundary import run_fit
from fedoap.training import evaluate, train_epochs
from fedoap.training.device import (
    DeviceOutOfMemory,
    GradStep,
    auto_precision,
    place,
    resolve_device,
    resolve_precision,
    session,
    setup,
)
from fedoap.training.engine import make_generator
from tests.conftest import results_of, tiny_config

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"
)


def quiet(cfg, path):
    return run_experiment(cfg, path, progress=False)


# ------------------------------------------------------------------ device selection


def test_cpu_and_auto_resolve_here():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_fails_before_any_folder(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"train\.device=cuda: CUDA is not available") as err:
        quiet(tiny_config("train.device=cuda"), out)
    assert "torch" in str(err.value)  # says what was found
    assert not out.exists()


def test_a_cuda_index_that_is_not_there_names_the_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake GPU")
    with pytest.raises(ConfigError, match=r"train\.device=cuda:7: .* 1 CUDA device.*cuda:0 Fake"):
        resolve_device("cuda:7")


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Old GPU")
    with pytest.raises(ConfigError, match=r"train\.precision=bf16: Old GPU .*fp16"):
        setup(TrainConfig(device="cuda", precision="bf16"))


def test_execution_settings_are_not_part_of_a_runs_identity():
    base = tiny_config()
    moved = tiny_config(
        "train.device=cpu",
        "train.compile=true",
        "train.deterministic=true",
        "train.eval_batch_size=7",
        "data.cache=false",
    )
    assert base.digest() == moved.digest()
    assert base.digest() != tiny_config("train.precision=fp32").digest()


def _global_state() -> tuple:
    return (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic,
    )


def test_session_sets_and_restores_global_state():
    before = _global_state()
    target = 1 if before[0] != 1 else 2
    t = TrainConfig(device="cpu", num_threads=target, deterministic=True, tf32=not before[2])
    with session(t) as device:
        assert device == torch.device("cpu")
        assert torch.get_num_threads() == target
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cuda.matmul.allow_tf32 == (not before[2])
    assert _global_state() == before


def test_the_cpu_budget_is_omp_num_threads_when_set_else_the_cores_it_may_use(monkeypatch):
    from fedoap.cpu import cpu_budget

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_budget() == 3
    allowed = len(os.sched_getaffinity(0))
    for unusable in ("0", "two", ""):
        monkeypatch.setenv("OMP_NUM_THREADS", unusable)
        assert cpu_budget() == allowed
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_budget() == allowed


def test_a_cpu_run_names_its_processor(tmp_path, monkeypatch):
    """CPU results differ in the last digits between processors (their vector kernels differ),
    so a CPU run records which one it ran on, as a GPU run records its GPU."""
    from fedoap.cpu import cpu_model
    from fedoap.training.device import describe

    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\n"
        "model name\t: Intel(R)  Xeon(R) Processor @ 2.80GHz\nflags\t: fpu\n\n"
        "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor @ 2.80GHz\n"
    )
    assert cpu_model(info) == "Intel(R) Xeon(R) Processor @ 2.80GHz"
    # No /proc/cpuinfo (macOS, Windows): the platform's own answer, or a plain fallback.
    import platform

    monkeypatch.setattr(platform, "processor", lambda: "arm")
    assert cpu_model(tmp_path / "missing") == "arm"
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert cpu_model(tmp_path / "missing") == "unknown CPU"
    monkeypatch.undo()
    assert describe(torch.device("cpu"))["name"] == cpu_model()


def test_test_workers_share_the_cores(threads_per_worker):
    """Under xdist each worker runs cores / workers torch threads, and so do the processes its
    tests start; without xdist the count is torch's own."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    assert torch.get_num_threads() == threads_per_worker
    if workers > 1:
        assert os.environ["OMP_NUM_THREADS"] == str(threads_per_worker)
        # Together the workers' threads do not outnumber the cores (one each, at least).
        assert threads_per_worker * workers <= max(workers, len(os.sched_getaffinity(0)))


# ------------------------------------------------------------------ data and uploads


def test_client_data_must_be_on_the_models_device():
    cfg = tiny_config()
    alg = build_algorithm(cfg)
    model = alg.build_model()
    client = prepare_clients(cfg.data)[0].to("meta")  # anything but the model's device
    with pytest.raises(ValueError, match="ClientData.to"):
        run_fit(
            alg,
            model,
            alg.init_global(model),
            alg.init_client(model),
            client,
            FitContext("c", 1, 0),
        )


def test_uploads_and_state_are_contiguous_cpu_fp32_even_from_channels_last():
    """What a site sends is the same CPU tensors whatever layout or device it trained in."""
    cfg = tiny_config("train.channels_last=true", "model.kv.mode=bank")
    alg = build_algorithm(cfg)
    model = alg.build_model()
    global_arrays, state = alg.init_global(model), alg.init_client(model)
    place(model, cfg.train, torch.device("cpu"))
    assert model.encoder.stages[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    client = prepare_clients(cfg.data)[0]
    update, new = run_fit(alg, model, global_arrays, state, client, FitContext("mri", 1, 0))
    assert set(update.arrays) == set(global_arrays) | {"kv.summary"}
    for k, v in {**update.arrays, **new.personal}.items():
        assert v.device.type == "cpu" and v.is_contiguous(), k
        assert v.dtype == (torch.float32 if v.is_floating_point() else v.dtype), k
    for k, v in update.arrays.items():
        if k in global_arrays:
            assert v.shape == global_arrays[k].shape


@needs_cuda
@pytest.mark.cuda
def test_a_cuda_site_and_a_cpu_site_in_one_federation():
    """Two sites, one on CUDA and one on the CPU: same keys, dtypes and CPU tensors, and the
    server's weighted mean of the two uploads is the closed form."""
    cfg = tiny_config("train.precision=fp32")
    alg = build_algorithm(cfg)
    clients = prepare_clients(cfg.data)[:2]
    g = alg.init_global(alg.build_model())
    updates = []
    for client, dev in zip(clients, ("cuda", "cpu"), strict=True):
        model = place(alg.build_model(), cfg.train, torch.device(dev))
        state = alg.init_client(alg.build_model())
        u, _ = run_fit(alg, model, g, state, client.to(dev), FitContext(client.name, 1, 0))
        updates.append(u)
    a, b = updates
    assert set(a.arrays) == set(b.arrays)
    for k in a.arrays:
        assert a.arrays[k].device.type == b.arrays[k].device.type == "cpu"
        assert a.arrays[k].dtype == b.arrays[k].dtype and a.arrays[k].is_contiguous()
    mean = alg.aggregate(g, updates, {}, build_aggregation(cfg))
    expected = weighted_mean(updates, list(a.arrays))
    na, nb = a.num_examples, b.num_examples
    k = next(k for k in a.arrays if a.arrays[k].is_floating_point())
    closed = (na * a.arrays[k].double() + nb * b.arrays[k].double()) / (na + nb)
    torch.testing.assert_close(mean[k].double(), closed)
    torch.testing.assert_close(mean[k], expected[k])


# ------------------------------------------------------------------ precision


def _toy_split(n: int = 48, size: int = 32) -> Split:
    """Bright squares on noise: learnable in a few epochs."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, size, size, generator=gen) * 0.3
    y = torch.zeros(n, 1, size, size)
    for i in range(n):
        r, c = (torch.randint(4, size - 12, (2,), generator=gen)).tolist()
        y[i, :, r : r + 8, c : c + 8] = 1
        x[i, :, r : r + 8, c : c + 8] += 2.0
    import numpy as np

    return Split(x=x, y=y, case_ids=np.arange(n).astype(str), names=np.arange(n).astype(str))


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_every_precision_learns(precision):
    """Loss falls and validation Dice beats the untrained model, for each autocast mode (fp16
    through its GradScaler)."""
    cfg = tiny_config(f"train.precision={precision}")
    alg = build_algorithm(dataclasses.replace(cfg, method="local"))
    model = alg.build_model()
    data = _toy_split()
    before = evaluate(model, data, precision)["dice"]
    opt = alg.trainer.optimizer(list(model.parameters()), None)
    gen = make_generator(0, "toy")
    first = train_epochs(model, opt, data, 1, alg.loss("fit"), gen, 8, precision)
    later = train_epochs(model, opt, data, 6, alg.loss("fit"), gen, 8, precision)
    after = evaluate(model, data, precision)["dice"]
    assert math.isfinite(first) and later < first
    assert after > before + 0.2


def test_fp16_skips_a_step_whose_gradients_overflow_and_lowers_the_scale():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    step = GradStep("fp16", torch.device("cpu"))
    assert step.scaler is not None
    scale = step.scaler.get_scale()
    step.backward((p * torch.tensor([math.inf, 1.0, 1.0])).sum())
    step.step(opt)
    step.update()
    assert torch.equal(p.detach(), torch.ones(3))  # skipped, not corrupted
    assert step.scaler.get_scale() < scale
    opt.zero_grad()
    step.backward(p.sum())
    step.step(opt)
    step.update()
    assert (p.detach() < 1).all()  # a finite step goes through, unscaled


# ------------------------------------------------------------------ compilation


@pytest.mark.slow
def test_one_compiled_module_serves_every_clients_weights():
    """Load three clients' weights into one compiled module: outputs match the eager model with
    the same weights, and no client after the first triggers a new compilation."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    cfg = tiny_config("train.compile=true", "train.precision=fp32")
    alg = build_algorithm(cfg)
    eager = alg.build_model().eval()
    compiled = place(alg.build_model(), cfg.train, torch.device("cpu")).eval()
    x = torch.randn(4, 1, 32, 32)
    weights = []
    for seed in range(3):
        torch.manual_seed(seed)
        weights.append({k: v + 0.01 * torch.randn_like(v) for k, v in eager.state_dict().items()})
    frames = []
    with torch.no_grad():
        for w in weights:
            eager.load_state_dict(w)
            compiled.load_state_dict(w)
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)
            frames.append(counters["stats"]["unique_graphs"])
    assert frames[0] >= 1 and frames[1] == frames[0] and frames[2] == frames[0]


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FEDOAP_TEST_COMPILE_RUN") != "1",
    reason="compiles a training graph on the CPU: 4 min cold on 2 cores; FEDOAP_TEST_COMPILE_RUN=1",
)
def test_compiled_run_trains_and_reports_its_warm_up(tmp_path):
    # One client whose splits are whole batches: one training and one evaluation graph, so the
    # test pays for one cold compilation (about a minute on two cores), not one per shape.
    one = (
        "data.clients=[{name: mri, source: synthetic, style: mri, num_images: 24}]",
        "data.max_train_images=16",
        "federation.rounds=2",
        "finetune.epochs=1",
    )
    s = quiet(tiny_config(*one, "train.compile=true"), tmp_path / "compiled")
    e = quiet(tiny_config(*one), tmp_path / "eager")
    phases = s["time"]["phases"]
    assert phases["compile"] > 0 and "compile" not in e["time"]["phases"]
    assert s["execution"]["compile"] is True
    # Same experiment, other kernels: the two runs agree up to float rounding's drift.
    assert abs(s["mean"]["test"]["dice"] - e["mean"]["test"]["dice"]) < 0.1
    assert s["config_digest"] == e["config_digest"]


# ------------------------------------------------------------------ timing and errors


def test_summary_splits_wall_time_into_phases(tmp_path):
    # deterministic=true must run on the CPU too (every op here has a deterministic kernel).
    s = quiet(
        tiny_config("federation.rounds=1", "finetune.epochs=1", "train.deterministic=true"),
        tmp_path / "r",
    )
    phases = s["time"]["phases"]
    assert {"data", "train", "aggregate", "validate", "checkpoint", "test"} <= set(phases)
    assert sum(phases.values()) <= s["time"]["seconds_total"] + phases["data"] + 1.0
    assert phases["train"] > 0
    assert s["execution"]["device"] == "cpu"
    assert s["execution"]["precision"] == auto_precision(torch.device("cpu"))
    assert s["execution"]["fedoap"] == importlib.metadata.version("fedoap")  # which release ran


@pytest.mark.parametrize(("native", "want"), [(True, "bf16"), (False, "fp32")])
def test_precision_auto_follows_the_cpu_and_the_run_records_what_it_ran_in(
    tmp_path, monkeypatch, native, want
):
    from fedoap.api import run_experiment
    from fedoap.bench import derive
    from fedoap.config import load_config

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
    cfg = tiny_config("federation.rounds=1", "finetune.epochs=0")
    assert cfg.train.precision == "auto"  # the default
    explicit = tiny_config("federation.rounds=1", "finetune.epochs=0", f"train.precision={want}")
    assert resolve_precision(cfg) == explicit
    # one identity with the explicit setting: a config that left precision at its default
    # keeps the identity its results had when the default was bf16, where bf16 is native
    assert derive(cfg, []).digest() == explicit.digest()
    s = run_experiment(cfg, tmp_path / "r", progress=False)
    assert s["execution"]["precision"] == want
    saved = load_config(tmp_path / "r" / "config.yaml")
    assert saved.train.precision == want and saved.digest() == explicit.digest()
    # a forced precision is kept
    forced = tiny_config("train.precision=bf16")
    assert resolve_precision(forced) is forced


def test_precision_auto_on_a_gpu_is_what_the_card_supports(monkeypatch):
    for supported, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert auto_precision(torch.device("cuda")) == want


def test_out_of_memory_names_batch_and_image_size(tmp_path, monkeypatch):
    from fedoap.models import FedOAPNet

    def oom(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(FedOAPNet, "forward", oom)
    with pytest.raises(DeviceOutOfMemory) as err:
        quiet(tiny_config("train.batch_size=8"), tmp_path / "r")
    msg = str(err.value)
    assert "train.batch_size=8" in msg and "data.image_size=32" in msg
    assert "try train.batch_size=4" in msg


def test_out_of_memory_is_a_one_line_cli_error(tmp_path, monkeypatch, capsys):
    import yaml

    from fedoap.cli.main import main
    from fedoap.models import FedOAPNet

    def oom(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(FedOAPNet, "forward", oom)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config().to_dict()))
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "-c", str(cfg), "-o", str(tmp_path / "r"), "-q"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "Traceback" not in err


# ------------------------------------------------------------------ CUDA only


@needs_cuda
@pytest.mark.cuda
def test_deterministic_cuda_runs_repeat_bit_for_bit(tmp_path):
    from fedoap.federation.checkpoint import load_tensors

    over = ("train.device=cuda", "train.deterministic=true", "model.kv.mode=bank")
    a = quiet(tiny_config(*over), tmp_path / "a")
    b = quiet(tiny_config(*over), tmp_path / "b")
    assert results_of(a) == results_of(b)
    ta, _ = load_tensors(tmp_path / "a" / "checkpoints" / "last.safetensors")
    tb, _ = load_tensors(tmp_path / "b" / "checkpoints" / "last.safetensors")
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_evaluate_on_another_device_than_the_run_names(tmp_path):
    """A run whose config says ``train.device=cuda`` (trained on a GPU) is re-scored on this
    machine with ``--device cpu``; without it, the missing device is named."""
    import yaml

    from fedoap.api import evaluate_run
    from fedoap.cli.main import main

    run = tmp_path / "r"
    summary = quiet(tiny_config("federation.rounds=1", "finetune.epochs=0"), run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"]["device"] = "cuda:7"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"train\.device=cuda:7"):
        evaluate_run(run)
    out = evaluate_run(run, device="cpu")
    for name, c in summary["clients"].items():
        assert out["clients"][name]["dice"] == pytest.approx(c["test"]["dice"])
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(run), "--device", "gpu"])
    assert exit_info.value.code == 2


def test_peak_memory_is_recorded_on_cuda_only(tmp_path):
    """summary.json's execution.peak_memory_gib: None on the CPU; on CUDA, the peak of the run."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = tiny_config(f"train.device={dev}", "federation.rounds=1", "finetune.epochs=0")
    peak = quiet(cfg, tmp_path / "run")["execution"]["peak_memory_gib"]
    if dev == "cpu":
        assert peak is None
    else:  # at least the model's weights and the data were on the device
        assert peak > 0
