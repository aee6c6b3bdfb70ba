"""Local training and evaluation loops.

These functions are the only place where a model sees data. The in-process runner and the Flower
client both reach them through the algorithm objects, so a method trains identically on either
runtime.

Randomness (shuffling, augmentation, PBL noise) comes from generators derived from
``(seed, stage, round, client)`` by :func:`make_generator`, never from global RNG state, so that a
resumed run replays exactly the draws of an uninterrupted one.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from fedoap.config import AugmentConfig
from fedoap.data.augment import augment_batch
from fedoap.data.dataset import Split
from fedoap.errors import DivergedError
from fedoap.metrics import case_dice, case_scores, image_metrics, summarize
from fedoap.training.device import GradStep, autocast

#: ``loss(logits, y, gen, x)``: logits and masks (B, 1, H, W), the batch's generator (for
#: stochastic losses such as PBL) and its input images (for losses that consult other models,
#: such as FedDP's calibration).
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator, torch.Tensor], torch.Tensor]


def make_generator(seed: int, *keys: Any, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded from ``seed`` and any mix of ints and strings (order
    matters). Draws are made on the device that uses them, so no batch waits for a host copy; a
    CUDA generator gives other numbers than a CPU one from the same seed, but the same numbers
    every time (resume is exact on either)."""
    words = [seed] + [zlib.crc32(str(k).encode()) for k in keys]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


def batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches covering every example once. A trailing batch of one example is
    merged into the previous one (batch norm cannot train on a single example)."""
    perm = torch.randperm(n, generator=gen, device=gen.device)
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    for i, s in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else n
        yield perm[s:end]


def step_begin(x: torch.Tensor) -> None:
    """Mark a new iteration for CUDA graphs (``train.compile_mode=reduce-overhead``), whose
    outputs are overwritten by the next replay; a no-op off CUDA."""
    if x.is_cuda:
        torch.compiler.cudagraph_mark_step_begin()


def batch_loss(
    model: nn.Module,
    data: Split,
    idx: torch.Tensor,
    loss_fn: LossFn,
    gen: torch.Generator,
    precision: str,
    augment: AugmentConfig | None,
) -> torch.Tensor:
    """The training loss of examples ``idx`` of ``data`` (augmented when ``augment`` is on):
    one forward pass, shared by :func:`train_epochs` and DP-SGD (fedoap.training.dp)."""
    x, y = data.x[idx], data.y[idx]
    if augment is not None and augment.enabled:
        x, y = augment_batch(x, y, augment, gen)
    step_begin(x)
    with autocast(precision, x.device.type):
        logits = model(x)
    return loss_fn(logits.float(), y, gen, x)


def train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Split,
    epochs: int,
    loss_fn: LossFn,
    gen: torch.Generator,
    batch_size: int,
    precision: str,
    augment: AugmentConfig | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    progress: Callable[[int], None] | None = None,
) -> float:
    """Train for ``epochs`` over ``data``; returns the mean training loss (without ``penalty``).

    ``data``, ``model`` and ``gen`` are on one device; nothing is copied between host and device
    inside the loop, and the loss is read back once, at the end (a per-step read would stall the
    GPU's queue). ``penalty`` adds a regulariser computed from the model alone (FedProx's
    proximal term, Ditto's pull towards the global model). ``progress`` is called with the batch
    size after each step (for progress bars).
    """
    model.train()
    device = data.x.device
    step = GradStep(precision, device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    # The first step whose loss was not finite (-1: none), tracked on the device so that the
    # loop still never waits for a host read.
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)
    count = steps = 0
    for _ in range(epochs):
        for idx in batches(len(data), batch_size, gen):
            loss = batch_loss(model, data, idx, loss_fn, gen, precision, augment)
            full = loss + penalty() if penalty is not None else loss
            optimizer.zero_grad(set_to_none=True)
            step.backward(full)
            step.step(optimizer)
            step.update()
            total += loss.detach().double() * len(idx)
            steps += 1
            bad_now = (first_bad < 0) & ~torch.isfinite(loss.detach())
            first_bad = torch.where(bad_now, steps, first_bad)
            count += len(idx)
            if progress is not None:
                progress(len(idx))
    bad, mean = int(first_bad), float(total) / max(count, 1)
    if bad >= 0:
        raise DivergedError(
            f"the loss was not finite at step {bad} of {steps} (mean loss {mean})", step=bad
        )
    if not all_finite(model.parameters()):
        raise DivergedError(f"the weights are not finite after {steps} steps", step=steps)
    return mean


def nonfinite_keys(arrays: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of the floating-point tensors in ``arrays`` that hold a NaN or an infinity."""
    return [k for k, v in arrays.items() if v.is_floating_point() and not bool(v.isfinite().all())]


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value of every floating-point tensor is finite (one host read in all)."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: torch.Tensor, precision: str, batch_size: int = 256
) -> torch.Tensor:
    """Logits (N, 1, H, W) in fp32, on ``x``'s device, for images ``x`` (N, C, H, W)."""
    model.eval()
    out = []
    for s in range(0, x.shape[0], batch_size):
        xb = x[s : s + batch_size]
        step_begin(xb)
        with autocast(precision, x.device.type):
            out.append(model(xb).float().clone())  # clone: CUDA graphs reuse their outputs
    return torch.cat(out) if out else torch.empty(0, 1, *x.shape[2:], device=x.device)


def evaluate(
    model: nn.Module,
    data: Split,
    precision: str,
    full: bool = False,
    batch_size: int = 256,
    cases: bool = False,
) -> dict[str, Any]:
    """Score ``model`` on a split. ``full`` adds HD95 (slower; used for test); ``cases`` adds
    ``cases``, one row of scores per case (:func:`fedoap.metrics.case_scores`).

    The forward passes run on the split's device in batches of ``batch_size``; the binary
    predictions come back to the CPU once, for the metrics."""
    pred = (predict_logits(model, data.x, precision, batch_size) > 0).cpu()
    truth = (data.y > 0.5).cpu()
    m = image_metrics(pred, truth, hd95=full)
    out: dict[str, Any] = summarize(m, case_dice(pred, truth, data.case_ids))
    if not full:
        out.pop("hd95_px", None)
        out.pop("hd95_pairs", None)
    if cases:
        out["cases"] = case_scores(pred, truth, data.case_ids)
    return out
