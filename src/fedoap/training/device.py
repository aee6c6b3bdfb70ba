"""Where and how a run executes: device, autocast precision, memory format, compilation, and the
process-global torch settings that go with them.

Every command that trains or scores goes through these functions, so the rules live in one
place:

* :func:`resolve_device` turns ``train.device`` into a ``torch.device`` and refuses a device that
  is not there, naming the key and what was found, before any data is read or folder is made.
* :func:`session` sets the process-global torch state a run needs (thread count, deterministic
  kernels, cuDNN autotuning, TF32) and restores the previous state when the run ends, so that a
  run never leaks its settings into whatever the process does next (a resumed run, a test).
* :func:`place` moves a model to the device, sets its memory format and compiles it once.
* :func:`autocast` and :class:`GradStep` implement ``train.precision``: bf16 autocast, fp16
  autocast with a gradient scaler, or plain fp32. Losses, optimiser state and uploads stay fp32.

Uploads and aggregation never see a device: :meth:`fedoap.algorithms.Algorithm.client_fit`
moves what a client receives to its device and what it sends back to the CPU, so CPU and CUDA
sites can be in one federation and exchange byte-identical payloads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fedoap.config import Config, ConfigError, TrainConfig
from fedoap.cpu import cpu_model
from fedoap.errors import FedoapError

#: cuBLAS needs a fixed workspace for deterministic results (CUDA docs, "Results reproducibility").
CUBLAS_DETERMINISTIC = ":4096:8"


def resolve_device(spec: str) -> torch.device:
    """``train.device`` -> a device that exists here, or a :class:`ConfigError` naming the key."""
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(
                f"train.device=mps: no Apple MPS device here ({_found()}); use train.device=auto"
            )
        return torch.device("mps")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device={spec}: CUDA is not available on this machine ({_found()}); "
                "use train.device=cpu or auto"
            )
        dev = torch.device(spec)
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        count = torch.cuda.device_count()
        if index >= count:
            names = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(count))
            raise ConfigError(
                f"train.device={spec}: this machine has {count} CUDA device(s) ({names})"
            )
        return torch.device("cuda", index)
    raise ConfigError(f"train.device: must be auto, cpu, cuda, cuda:N or mps, got {spec!r}")


def _found() -> str:
    """What this torch build and machine offer, for error messages."""
    cuda = torch.version.cuda
    kind = f"built for CUDA {cuda}" if cuda else "CPU-only build"
    build = f"torch {torch.__version__}, {kind}"
    if cuda and not torch.cuda.is_available():
        build += ", no CUDA device or driver found"
    return build


def auto_precision(device: torch.device) -> str:
    """What ``train.precision=auto`` means on ``device``: bf16 where it is native (a CUDA GPU
    that supports it, a CPU with AVX512-BF16 or AMX), fp32 elsewhere."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and native_low_precision("bf16", device):
        return "bf16"
    return "fp32"


def resolve_precision(cfg: Config) -> Config:
    """``cfg`` with ``train.precision=auto`` replaced by what it means on the run's device
    (:func:`auto_precision`); any other value is kept. A run resolves it before its config is
    saved or its identity (``Config.digest``) is taken, so a run records the precision it ran
    in, and a config that left precision at its default keeps the identity it had when that
    default was bf16 wherever bf16 is native."""
    if cfg.train.precision != "auto":
        return cfg
    precision = auto_precision(resolve_device(cfg.train.device))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot run, before anything runs."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise ConfigError(
            f"train.precision=bf16: {name} has no bf16 support; use train.precision=fp16 "
            "(autocast with a gradient scaler) or fp32"
        )


def native_low_precision(precision: str, device: torch.device) -> bool:
    """Whether ``device`` computes ``precision`` natively. A CPU without AVX512-BF16 or AMX
    emulates bf16: on an AVX2-only AMD EPYC, training the quickstart's model in bf16 ran at
    one tenth of fp32's speed (benchmarks/precision/cpu_speed.py)."""
    if precision == "auto":
        precision = auto_precision(device)
    if precision == "fp32" or device.type != "cpu":
        return True
    if precision == "bf16":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return bool(torch.cpu._is_amx_fp16_supported())


def precision_note(precision: str, device: torch.device) -> str | None:
    """A note for runs whose precision the CPU emulates (correct, but several times slower)."""
    if native_low_precision(precision, device):
        return None
    return (
        f"train.precision={precision}: this CPU has no native {precision} (no AVX512-BF16/AMX), "
        "so autocast emulates it and training runs several times slower than "
        "train.precision=fp32 here"
    )


def describe(device: torch.device) -> dict[str, Any]:
    """The device and software as recorded in ``summary.json``."""
    from fedoap.version import fedoap_version

    out: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "fedoap": fedoap_version(),
    }
    if device.type == "cuda":
        out["name"] = torch.cuda.get_device_name(device)
        out["cuda"] = torch.version.cuda
    elif device.type == "cpu":
        out["name"] = cpu_model()
    return out


def reset_peak_memory(device: torch.device) -> None:
    """Start counting :func:`peak_memory_gib` from now (CUDA; a no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """The most device memory tensors held since :func:`reset_peak_memory`, in GiB (CUDA's
    allocator; None on the CPU and MPS, where torch does not track it)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def setup(t: TrainConfig) -> torch.device:
    """Resolve and check the execution settings of ``t``; raises before any work starts."""
    device = resolve_device(t.device)
    check_precision(t.precision, device)
    return device


# ------------------------------------------------------------------ process-global state


@contextlib.contextmanager
def session(t: TrainConfig, device: torch.device | None = None) -> Iterator[torch.device]:
    """Run with ``t``'s thread count, determinism, cuDNN autotuning and TF32 settings, then
    restore every one of them. Yields the resolved device.

    ``deterministic`` turns on torch's deterministic kernels (an error, not a silent fallback,
    where an op has none) and turns cuDNN autotuning off; otherwise cuDNN benchmarks its
    convolution algorithms once per shape, which is faster but not repeatable bit for bit.
    """
    device = device if device is not None else setup(t)
    old = {
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn": torch.is_deterministic_algorithms_warn_only_enabled(),
        "benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
    try:
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        if t.deterministic:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC
            torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = t.deterministic
        torch.backends.cudnn.benchmark = device.type == "cuda" and not t.deterministic
        torch.backends.cuda.matmul.allow_tf32 = t.tf32
        torch.backends.cudnn.allow_tf32 = t.tf32
        yield device
    finally:
        torch.set_num_threads(old["threads"])
        torch.use_deterministic_algorithms(
            old["deterministic"], warn_only=old["deterministic_warn"]
        )
        torch.backends.cudnn.benchmark = old["benchmark"]
        torch.backends.cudnn.deterministic = old["cudnn_deterministic"]
        torch.backends.cuda.matmul.allow_tf32 = old["tf32_matmul"]
        torch.backends.cudnn.allow_tf32 = old["tf32_cudnn"]
        if old["cublas"] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = old["cublas"]


# ------------------------------------------------------------------ models


def uses_channels_last(
    t: TrainConfig, device: torch.device, per_example_grads: bool = False
) -> bool:
    """``train.channels_last``; unset: on for CUDA, off elsewhere, and off under DP-SGD
    (``per_example_grads``): Opacus sums per-example gradients in the contiguous layout, and
    CUDA's fused AdamW refuses a gradient whose strides differ from its weight's (the config
    refuses ``channels_last=true`` with ``privacy.dp``)."""
    if per_example_grads:
        return False
    return t.channels_last if t.channels_last is not None else device.type == "cuda"


def place(
    model: nn.Module,
    t: TrainConfig,
    device: torch.device,
    compile: bool = True,
    per_example_grads: bool = False,
) -> nn.Module:
    """Move ``model`` to ``device`` in place, in channels_last where chosen, and compile it once
    when ``train.compile`` is on (and ``compile`` allows it: eval-only commands skip it).

    Compilation uses ``nn.Module.compile``, which keeps the module object and its state-dict
    keys: every client's weights are loaded into this one compiled module with
    ``load_state_dict``, so a run compiles once per process, not once per client or round.
    """
    last = uses_channels_last(t, device, per_example_grads)
    fmt = torch.channels_last if last else torch.contiguous_format
    model.to(device=device, memory_format=fmt)  # type: ignore[call-overload]  # torch's stubs lag
    if compile and t.compile:
        # CUDA graphs need CUDA; elsewhere the mode would only warn.
        mode = t.compile_mode
        if device.type != "cuda" and mode == "reduce-overhead":
            mode = "default"
        model.compile(mode=mode)
    return model


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's parameters (CPU for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so that a timer measures work rather than its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Timer:
    """Wall seconds per phase (``with timer("train"): ...``), device-synchronised at the end of
    each phase so that asynchronous GPU work is charged to the phase that queued it."""

    def __init__(self, device: torch.device, seconds: dict[str, float] | None = None) -> None:
        self.device = device
        self.seconds: dict[str, float] = dict(seconds or {})

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


# ------------------------------------------------------------------ precision


def autocast(precision: str, device_type: str = "cpu") -> contextlib.AbstractContextManager[Any]:
    """Autocast for ``train.precision`` on ``device_type``; a no-op for fp32. ``auto`` (a config
    used without a run resolving it, :func:`resolve_precision`) means what it means there."""
    if precision == "auto":
        precision = auto_precision(torch.device(device_type))
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device_type, dtype=torch.float16)
    return contextlib.nullcontext()


class GradStep:
    """``backward`` + ``optimizer.step`` for a precision: fp16 scales the loss with a
    :class:`torch.amp.GradScaler` (and skips steps whose gradients overflowed); bf16 and fp32
    step directly. One instance per training call; its scale starts afresh each call, so a
    resumed run repeats the same steps."""

    def __init__(self, precision: str, device: torch.device) -> None:
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)

    def unscale(self, grad: torch.Tensor) -> torch.Tensor:
        """An unscaled copy of a gradient the optimiser does not own (APFL's mixing weight),
        zero where the scaled gradient overflowed."""
        if self.scaler is None:
            return grad
        g = grad / self.scaler.get_scale()
        return torch.where(torch.isfinite(g), g, torch.zeros_like(g))

    def update(self) -> None:
        """Once per iteration, after every optimiser of the iteration has stepped."""
        if self.scaler is not None:
            self.scaler.update()


# ------------------------------------------------------------------ out of memory


class DeviceOutOfMemory(FedoapError, RuntimeError):
    """The device ran out of memory; the message names the sizes to reduce."""


@contextlib.contextmanager
def oom_guard(t: TrainConfig, image_size: int, device: torch.device) -> Iterator[None]:
    """Turn a device's out-of-memory error into :class:`DeviceOutOfMemory` with advice."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise DeviceOutOfMemory(out_of_memory_message(t, image_size, device)) from None


def out_of_memory_message(t: TrainConfig, image_size: int, device: torch.device) -> str:
    """What to tell a user whose GPU ran out of memory (instead of a CUDA traceback)."""
    where = describe(device).get("name", str(device))
    total = ""
    if device.type == "cuda":
        total = f" ({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)"
    return (
        f"out of memory on {where}{total} with train.batch_size={t.batch_size}, "
        f"train.eval_batch_size={t.eval_batch_size} and data.image_size={image_size}: "
        f"try train.batch_size={max(1, t.batch_size // 2)}, "
        f"train.eval_batch_size={max(1, t.eval_batch_size // 4)}, a smaller data.image_size or "
        "model.width, or train.precision=bf16"
    )
