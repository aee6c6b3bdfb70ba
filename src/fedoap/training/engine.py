"""Local training and evaluation loops.

These functions are the only place where a model sees data. The in-process runner and the Flower
client both reach them through the algorithm objects, so a method trains identically on either
runtime.

Randomness (shuffling, augmentation, PBL noise) comes from generators derived from
``(seed, stage, round, client)`` by :func:`make_generator`, never from global RNG state, so that a
resumed run replays exactly the draws of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from fedoap.config import AugmentConfig
from fedoap.data.augment import augment_batch
from fedoap.data.dataset import Split
from fedoap.metrics import case_dice, image_metrics, summarize

#: ``loss(logits, y, gen, x)``: logits and masks (B, 1, H, W), the batch's generator (for
#: stochastic losses such as PBL) and its input images (for losses that consult other models,
#: such as FedDP's calibration).
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator, torch.Tensor], torch.Tensor]


def make_generator(seed: int, *keys: Any) -> torch.Generator:
    """A torch generator seeded from ``seed`` and any mix of ints and strings (order matters)."""
    words = [seed] + [zlib.crc32(str(k).encode()) for k in keys]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads (0 keeps torch's default), then restore the old count.

    The count is process-global in torch, and float reductions depend on it, so a run must not
    leak its setting into whatever the process does next (a resumed run, a test).
    """
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def autocast(precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CPU, or a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches covering every example once. A trailing batch of one example is
    merged into the previous one (batch norm cannot train on a single example)."""
    perm = torch.randperm(n, generator=gen)
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    for i, s in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else n
        yield perm[s:end]


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

    ``penalty`` adds a regulariser computed from the model alone (FedProx's proximal term,
    Ditto's pull towards the global model). ``progress`` is called with the batch size after each
    step (for progress bars).
    """
    model.train()
    total, count = 0.0, 0
    for _ in range(epochs):
        for idx in batches(len(data), batch_size, gen):
            x, y = data.x[idx], data.y[idx]
            if augment is not None and augment.enabled:
                x, y = augment_batch(x, y, augment, gen)
            with autocast(precision):
                logits = model(x)
            loss = loss_fn(logits.float(), y, gen, x)
            full = loss + penalty() if penalty is not None else loss
            optimizer.zero_grad(set_to_none=True)
            full.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            if progress is not None:
                progress(len(idx))
    return total / max(count, 1)


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: torch.Tensor, precision: str, batch_size: int = 64
) -> torch.Tensor:
    """Logits (N, 1, H, W) in fp32 for images ``x`` (N, C, H, W)."""
    model.eval()
    out = []
    for s in range(0, x.shape[0], batch_size):
        with autocast(precision):
            out.append(model(x[s : s + batch_size]).float())
    return torch.cat(out) if out else torch.empty(0, 1, *x.shape[2:])


def evaluate(model: nn.Module, data: Split, precision: str, full: bool = False) -> dict[str, Any]:
    """Score ``model`` on a split. ``full`` adds HD95 and case Dice (slower; used for test)."""
    pred = predict_logits(model, data.x, precision) > 0
    m = image_metrics(pred, data.y > 0.5, hd95=full)
    cases = case_dice(pred, data.y > 0.5, data.case_ids)
    out = summarize(m, cases)
    if not full:
        out.pop("hd95_px", None)
        out.pop("hd95_pairs", None)
    return out
