"""APFL: Deng, Kamani, Mahdavi, "Adaptive Personalized Federated Learning", 2020.

Each client keeps a local model ``v`` and a mixing weight ``alpha`` in [0, 1]; the global model
``w`` is trained and averaged as in FedAvg. The client's personalised model is the mixture

    v_bar = alpha * v + (1 - alpha) * w

and every local step updates all three (Algorithm 1 of the paper):

    w     <- w     - eta grad_w L(w)
    v     <- v     - eta grad_v L(v_bar)        (= alpha grad L at v_bar)
    alpha <- alpha - eta_a grad_alpha L(v_bar),  clipped to [0, 1]

``w`` is uploaded; ``v`` and ``alpha`` never leave the client; ``v_bar`` is what is validated,
selected and tested.

Departures: AdamW for ``w`` and ``v`` (the project's client optimiser) and plain gradient steps
for ``alpha``; the mixture's buffers (none with InstanceNorm) come from ``v``. Two
forward/backward passes per batch, like Ditto: twice FedAvg's compute. No fine-tuning stage.

Config keys: ``algorithm.alpha`` (initial mixing weight, 0.5), ``algorithm.alpha_lr`` (0.01).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from fedoap.algorithms.base import Algorithm, FitContext
from fedoap.algorithms.registry import ALGORITHMS
from fedoap.basetypes import SHARED, ClientState, Update, clone
from fedoap.config import ranged
from fedoap.data.augment import augment_batch
from fedoap.data.dataset import ClientData
from fedoap.models import StateDict
from fedoap.models.partition import prefixed, sub
from fedoap.training.device import GradStep, autocast
from fedoap.training.engine import batches, step_begin

LOCAL = "local/"
ALPHA = "alpha"


@dataclass(frozen=True)
class APFLOptions:
    alpha: float = ranged(0.5, ge=0, le=1)
    alpha_lr: float = ranged(0.01, ge=0)


def mix(v: StateDict, w: StateDict, alpha: torch.Tensor) -> StateDict:
    """``alpha * v + (1 - alpha) * w`` for floating tensors; other tensors from ``v``."""
    return {k: alpha * v[k] + (1 - alpha) * w[k] if v[k].is_floating_point() else v[k] for k in v}


@ALGORITHMS.register("apfl")
class APFL(Algorithm):
    name = "apfl"
    Options = APFLOptions

    def passes_per_round(self) -> int:
        return 2 * self.cfg.train.local_epochs

    def init_client(self, model: nn.Module) -> ClientState:
        state = super().init_client(model)
        state.extra = {
            **prefixed(clone(model.state_dict()), LOCAL),
            ALPHA: torch.tensor(float(self.options.alpha)),
        }
        return state

    def personalize(self, model: nn.Module, global_arrays: StateDict, state: ClientState) -> None:
        w = sub(global_arrays, SHARED)
        model.load_state_dict(mix(sub(state.extra, LOCAL), w, state.extra[ALPHA]))

    def fit(
        self,
        model: nn.Module,
        global_arrays: StateDict,
        state: ClientState,
        data: ClientData,
        ctx: FitContext,
    ) -> tuple[Update, ClientState]:
        t = self.cfg.train
        self.load(model, global_arrays, state)  # the module holds w; v lives in v_params
        w_params = dict(model.named_parameters())
        v_state = sub(state.extra, LOCAL)
        # The local model's parameters, trained through the mixture.
        v_params = {k: nn.Parameter(v_state[k].clone()) for k in w_params}
        buffers = {k: v_state[k] for k, _ in model.named_buffers()}
        alpha = state.extra[ALPHA].clone().requires_grad_(True)
        opt_w = self.trainer.optimizer(list(w_params.values()), state.optimizers.get("fit"))
        opt_v = self.trainer.optimizer(list(v_params.values()), state.optimizers.get("local"))
        gen = ctx.generator("fit")
        dev = ctx.device
        step = GradStep(t.precision, dev)
        total = torch.zeros((), dtype=torch.float64, device=dev)  # read back once, at the end
        count = 0
        model.train()
        for _ in range(t.local_epochs):
            for idx in batches(len(data.train), t.batch_size, gen):
                x, y = data.train.x[idx], data.train.y[idx]
                if self.cfg.data.augment.enabled:
                    x, y = augment_batch(x, y, self.cfg.data.augment, gen)
                # 1. the global model's step
                step_begin(x)
                with autocast(t.precision, dev.type):
                    z = model(x)
                loss_w = self.seg_loss(z.float(), y)
                opt_w.zero_grad(set_to_none=True)
                step.backward(loss_w)
                step.step(opt_w)
                # 2. the local model and alpha, through the mixture (w held fixed)
                mixed = {
                    k: alpha * v_params[k] + (1 - alpha) * w_params[k].detach() for k in v_params
                }
                with autocast(t.precision, dev.type):
                    zm = functional_call(model, {**mixed, **buffers}, (x,))
                loss_v = self.seg_loss(zm.float(), y)
                opt_v.zero_grad(set_to_none=True)
                alpha.grad = None
                step.backward(loss_v)
                step.step(opt_v)
                with torch.no_grad():
                    assert alpha.grad is not None
                    alpha -= self.options.alpha_lr * step.unscale(alpha.grad)
                    alpha.clamp_(0.0, 1.0)
                step.update()
                total += loss_v.detach().double() * len(idx)
                count += len(idx)
                if ctx.progress is not None:
                    ctx.progress(2 * len(idx))
        upload = self.upload(model, data, ctx)
        v_new = {**{k: p.detach().clone() for k, p in v_params.items()}, **clone(buffers)}
        new_state = dataclasses.replace(
            state,
            extra={**prefixed(v_new, LOCAL), ALPHA: alpha.detach().clone()},
            optimizers={"fit": opt_w.state_dict(), "local": opt_v.state_dict()},
        )
        loss = float(total) / max(count, 1)
        return Update(upload, len(data.train), {"train_loss": loss}), new_state
