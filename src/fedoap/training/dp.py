"""Local training under DP-SGD (``privacy.dp``; see :mod:`fedoap.privacy`).

The same loop as :func:`fedoap.training.engine.train_epochs`, with Poisson-sampled batches and
Opacus's per-example clipping and noise (``GradSampleModule`` + ``DPOptimizer`` around the
method's own optimiser, so its state persists across rounds as without DP). Opacus is imported
here only, when a DP run trains.

Under ``privacy.dp.unit=case`` the sampled and clipped rows are cases: a step samples cases and
takes all their images, and before clipping each case's per-example gradients are averaged
into one row (the gradient of the mean loss over its images), so one case moves the sum by at
most the clip norm, whatever its number of images.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fedoap.config import AugmentConfig
from fedoap.data.dataset import Split
from fedoap.errors import DivergedError
from fedoap.privacy import SiteDP, case_index
from fedoap.training.engine import LossFn, all_finite, batch_loss


def dp_train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Split,
    epochs: int,
    loss_fn: LossFn,
    gen: torch.Generator,
    dp: SiteDP,
    precision: str,
    augment: AugmentConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> float:
    """``epochs`` x ``dp.steps_per_epoch`` DP-SGD steps; returns the mean training loss per
    example seen. ``loss_fn`` must be a mean of per-example terms (fedoap.privacy)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model.train()
    device = data.x.device
    n = len(data)
    # Opacus's backward hooks cannot see through in-place activations; out of place they
    # compute the same function. Restored when the call ends.
    inplace = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for m in inplace:
        m.inplace = False  # type: ignore[assignment]
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    opt = DPOptimizer(
        optimizer,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=dp.expected_batch,
        loss_reduction="mean",
        generator=gen,
    )
    # Each image's unit: itself, or its case (numbered in order of first appearance).
    codes = case_index(data.case_ids) if dp.unit == "case" else None
    n_units = int(codes.max()) + 1 if codes is not None and n else n
    unit = torch.from_numpy(codes).to(device) if codes is not None else None
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = steps = 0
    try:
        for _ in range(epochs):
            for _ in range(dp.steps_per_epoch):
                taken = torch.rand(n_units, generator=gen, device=device) < dp.sample_rate
                idx = torch.nonzero(taken if unit is None else taken[unit]).flatten()
                opt.zero_grad(set_to_none=True)
                steps += 1
                if len(idx) == 0:  # an empty Poisson batch: the step is noise alone
                    for p in opt.params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                    opt.step()
                    continue
                loss = batch_loss(gsm, data, idx, loss_fn, gen, precision, augment)
                with warnings.catch_warnings():
                    # The first layer's input needs no gradient, which its hook notes each step.
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                if unit is not None:
                    per_case_rows(opt.params, unit[idx])
                opt.step()
                if not bool(torch.isfinite(loss.detach())):
                    raise DivergedError(
                        f"the loss was not finite at DP step {steps} ({float(loss)})", step=steps
                    )
                total += loss.detach().double() * len(idx)
                count += len(idx)
                if progress is not None:
                    progress(len(idx))
    finally:
        opt.zero_grad(set_to_none=True)
        gsm._close()  # hooks and per-sample attributes off the model
        for m in inplace:
            m.inplace = True  # type: ignore[assignment]
    if not all_finite(model.parameters()):
        raise DivergedError(f"the weights are not finite after {steps} DP steps", step=steps)
    return float(total) / max(count, 1)


def per_case_rows(params: Sequence[Any], cases: torch.Tensor) -> None:
    """Replace each parameter's per-example gradients (one row per image, ``cases`` giving each
    row's case) by one row per case present: the mean of its images' rows, i.e. the gradient of
    the case's mean loss. The optimiser then clips and noises cases, not images."""
    _, row = torch.unique(cases, return_inverse=True)
    k = int(row.max()) + 1
    size = torch.bincount(row, minlength=k)
    for p in params:
        g = p.grad_sample
        if g is None:  # Opacus's step names the parameter that got no gradient
            continue
        if isinstance(g, list):  # accumulated over several backward passes
            g = torch.cat(g)
        out = torch.zeros((k, *g.shape[1:]), dtype=g.dtype, device=g.device)
        out.index_add_(0, row, g)
        p.grad_sample = out / size.view(-1, *([1] * (g.ndim - 1))).to(g.dtype)
