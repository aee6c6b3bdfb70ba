"""The device boundary of a site's step, and what happens when training diverges.

A method's :meth:`~fedoap.algorithms.Algorithm.fit` and
:meth:`~fedoap.algorithms.Algorithm.finetune_epoch` run on the site model's device.
:func:`run_fit` and :func:`run_finetune_epoch` are what the site calls: what the client receives
(global arrays, its own state) goes to the model's device; what it sends (the upload) and keeps
between rounds (its state) comes back as contiguous CPU tensors. Uploads are therefore the same
tensors and bytes whatever device a site trains on, and aggregation never sees a device. Both
check that what comes back is finite, and turn a diverged loop into a
:class:`~fedoap.errors.DivergedError` that names the client, the round and what to try.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fedoap.algorithms import Algorithm, FitContext
from fedoap.basetypes import ClientState, StateDict, Update
from fedoap.config import Config
from fedoap.data.dataset import ClientData
from fedoap.errors import DivergedError
from fedoap.training.device import model_device
from fedoap.training.engine import nonfinite_keys


def run_fit(
    alg: Algorithm,
    model: nn.Module,
    global_arrays: StateDict,
    state: ClientState,
    data: ClientData,
    ctx: FitContext,
) -> tuple[Update, ClientState]:
    """``alg.fit`` on the model's device; the upload and the new state on the CPU."""
    args = on_device(model, global_arrays, state, data, ctx)
    with divergence_guard(alg.cfg, ctx, "fit"):
        update, new = alg.fit(model, *args)
    cpu = torch.device("cpu")
    upload = Update(to_device(update.arrays, cpu), update.num_examples, update.metrics)
    new = state_to(new, cpu)
    # Every method's loop ends in train_epochs' check; this one also covers what a method
    # computes after it (uploads, KV summaries, personal state) and its own loops.
    check_finite(alg.cfg, ctx, "fit", update.metrics.get("train_loss"), upload.arrays, new)
    return upload, new


def run_finetune_epoch(
    alg: Algorithm,
    model: nn.Module,
    global_arrays: StateDict,
    state: ClientState,
    data: ClientData,
    ctx: FitContext,
    first: bool,
) -> tuple[float, ClientState]:
    """``alg.finetune_epoch`` on the model's device (see :func:`run_fit`)."""
    args = on_device(model, global_arrays, state, data, ctx)
    with divergence_guard(alg.cfg, ctx, "finetune"):
        loss, new = alg.finetune_epoch(model, *args, first)
    new = state_to(new, torch.device("cpu"))
    check_finite(alg.cfg, ctx, "finetune", loss, {}, new)
    return loss, new


# ---------------------------------------------------------------------- the device boundary


def to_device(arrays: StateDict, device: torch.device, copy: bool = False) -> StateDict:
    """``arrays`` on ``device``; on the CPU as contiguous tensors (what is saved and sent).
    Tensors already there are not copied unless ``copy``."""
    if device.type == "cpu":
        return {k: v.detach().to(device, copy=copy).contiguous() for k, v in arrays.items()}
    return {k: v.detach().to(device, copy=copy) for k, v in arrays.items()}


def _tree_to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu").contiguous()
    if isinstance(obj, dict):
        return {k: _tree_to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_tree_to_cpu(v) for v in obj]
    return obj


def state_to(state: ClientState, device: torch.device) -> ClientState:
    """A client's state with its tensors on ``device``. Optimiser states go to the device only
    through ``load_state_dict`` (which puts AdamW's step counters where each implementation
    wants them), and come back to the CPU whole."""
    optimizers = _tree_to_cpu(state.optimizers) if device.type == "cpu" else state.optimizers
    return ClientState(
        personal=to_device(state.personal, device),
        optimizers=optimizers,
        extra=to_device(state.extra, device),
    )


def on_device(
    model: nn.Module,
    global_arrays: StateDict,
    state: ClientState,
    data: ClientData,
    ctx: FitContext,
) -> tuple[StateDict, ClientState, ClientData, FitContext]:
    """A client step's inputs on the model's device, after checking that the client's data is
    there already (the runtimes move each client's splits once, never per batch)."""
    dev = model_device(model)
    if data.train.x.device != dev:
        raise ValueError(
            f"client {data.name!r}: data on {data.train.x.device} but the model on {dev}; "
            "move the client's splits once with ClientData.to(device)"
        )
    return (
        to_device(global_arrays, dev),
        state_to(state, dev),
        data,
        dataclasses.replace(ctx, device=dev),
    )


# ---------------------------------------------------------------------- divergence


def lr_key(cfg: Config, stage: str) -> str:
    """The config key of the learning rate a stage trains with."""
    if stage == "finetune" and cfg.finetune.lr is not None:
        return "finetune.lr"
    return "train.lr"


def diverged(
    cfg: Config, ctx: FitContext, stage: str, detail: str, step: int | None
) -> DivergedError:
    """The error for a client whose training stopped being finite: where, and what to try."""
    key = lr_key(cfg, stage)
    lr = cfg.finetune.lr if key == "finetune.lr" else cfg.train.lr
    return DivergedError(
        f"client '{ctx.client}', round {ctx.round} ({stage}): training diverged: {detail}. "
        f"Likely causes: a learning rate too high for this model ({key}={lr:g}) or badly "
        "scaled input images (see the data notes). Lower the learning rate, or set "
        "train.on_divergence=exclude to drop this client and let the others go on",
        client=ctx.client,
        round=ctx.round,
        stage=stage,
        step=step,
        detail=detail,
    )


@contextlib.contextmanager
def divergence_guard(cfg: Config, ctx: FitContext, stage: str) -> Iterator[None]:
    """Give a :class:`DivergedError` from the training loop its client, round and advice."""
    try:
        yield
    except DivergedError as err:
        if err.client is not None:
            raise
        raise diverged(cfg, ctx, stage, err.detail, err.step) from None


def check_finite(
    cfg: Config,
    ctx: FitContext,
    stage: str,
    loss: float | None,
    upload: StateDict,
    state: ClientState,
) -> None:
    """Raise :class:`DivergedError` if the loss, the upload or the kept state is not finite."""
    if loss is not None and not math.isfinite(loss):
        raise diverged(cfg, ctx, stage, f"the mean training loss is {loss}", None)
    parts = {"upload": upload, "personal state": state.personal, "extra state": state.extra}
    for what, arrays in parts.items():
        bad = nonfinite_keys(arrays)
        if bad:
            raise diverged(
                cfg,
                ctx,
                stage,
                f"{len(bad)} tensor(s) of its {what} are not finite ({bad[0]})",
                None,
            )
