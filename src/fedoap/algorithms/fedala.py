"""FedALA: Zhang, Hua, Wang, Wang, Cao, Zhou, "FedALA: Adaptive Local Aggregation for
Personalized Federated Learning", AAAI 2023.

The server is FedAvg's. Each client, instead of overwriting its model with the global one,
initialises it by *adaptive local aggregation* (ALA):

    theta_hat = theta_local + (theta_global - theta_local) * W      (the ALA layers)
    theta_hat = theta_global                                        (all lower layers)

with element-wise weights ``W`` in [0, 1] (initialised to 1, kept by the client) learned by
gradient steps ``W <- clip(W - eta grad_W L(theta_hat), 0, 1)`` on a random ``rand_percent`` of
its training data: until the loss settles the first time (std of the last ``num_pre_loss``
losses below ``threshold``, at most ``max_ala_epochs`` epochs), one epoch afterwards. Then the
usual local epochs from ``theta_hat``; the whole model is uploaded. The ALA-initialised model is
what each client validates.

The ALA layers are named by module path (``ala_modules``); the paper's "higher layers" of a
U-Net are its head, the default.

Departures: AdamW for the local epochs (the project's client optimiser); the first-round
convergence loop is capped at ``max_ala_epochs``.

Config keys: ``algorithm.ala_modules`` (["head"]), ``rand_percent`` (0.8), ``eta`` (1.0),
``threshold`` (0.1), ``num_pre_loss`` (10), ``max_ala_epochs`` (5).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from fedoap.algorithms.base import Algorithm, FitContext
from fedoap.algorithms.registry import ALGORITHMS
from fedoap.basetypes import SHARED, ClientState, Update, clone
from fedoap.config import ConfigError, ranged
from fedoap.data.dataset import ClientData
from fedoap.models import StateDict
from fedoap.models.partition import module_state_keys, prefixed, sub
from fedoap.training import autocast
from fedoap.training.engine import batches

LOCAL, WEIGHTS = "local/", "ala_w/"


@dataclass(frozen=True)
class FedALAOptions:
    ala_modules: tuple[str, ...] = ("head",)
    rand_percent: float = ranged(0.8, gt=0, le=1)
    eta: float = ranged(1.0, ge=0)
    threshold: float = ranged(0.1, ge=0)
    num_pre_loss: int = ranged(10, ge=1, le=10_000)
    max_ala_epochs: int = ranged(5, ge=0, le=10_000)


@ALGORITHMS.register("fedala")
class FedALA(Algorithm):
    name = "fedala"
    Options = FedALAOptions

    def ala_keys(self, model: nn.Module) -> list[str]:
        """Parameter keys of the ALA layers, from module structure."""
        params = dict(model.named_parameters())
        keys = []
        for path in self.options.ala_modules:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise ConfigError(
                    f"algorithm.ala_modules: no module {path!r} in the model"
                ) from None
            keys += [k for k in module_state_keys(model, module) if k in params]
        return keys

    def combine(self, global_w: StateDict, state: ClientState, keys: list[str]) -> StateDict:
        """theta_hat from the global model, the client's last local model and its weights W."""
        local, w = sub(state.extra, LOCAL), sub(state.extra, WEIGHTS)
        if not local or not w:  # before the first ALA step, W = 1: the global model
            return dict(global_w)
        out = dict(global_w)
        for k in keys:
            out[k] = local[k] + (global_w[k] - local[k]) * w[k]
        return out

    def personalize(self, model: nn.Module, global_arrays: StateDict, state: ClientState) -> None:
        g = sub(global_arrays, SHARED)
        model.load_state_dict(self.combine(g, state, self.ala_keys(model)))

    def learn_weights(
        self, model: nn.Module, g: StateDict, state: ClientState, data: ClientData, ctx: FitContext
    ) -> StateDict:
        """ALA: learn W on a random subset of the training data (Algorithm 1 of the paper)."""
        o, t = self.options, self.cfg.train
        keys = self.ala_keys(model)
        local = sub(state.extra, LOCAL)
        w_old = sub(state.extra, WEIGHTS)
        first = not w_old
        weights = {
            k: (w_old[k] if k in w_old else torch.ones_like(g[k])).clone().requires_grad_(True)
            for k in keys
        }
        gen = ctx.generator("ala")
        n = len(data.train)
        n_sub = max(1, int(o.rand_percent * n))
        subset = torch.randperm(n, generator=gen, device=gen.device)[:n_sub]
        base = {k: v for k, v in g.items() if k not in keys}
        losses: list[float] = []
        model.train()
        for _ in range(o.max_ala_epochs if first else 1):
            for idx in batches(len(subset), t.batch_size, gen):
                sel = subset[idx]
                top = {k: local[k] + (g[k] - local[k]) * weights[k] for k in keys}
                with autocast(t.precision, ctx.device.type):
                    z = functional_call(model, {**base, **top}, (data.train.x[sel],))
                loss = self.seg_loss(z.float(), data.train.y[sel])
                grads = torch.autograd.grad(loss, [weights[k] for k in keys])
                with torch.no_grad():
                    for k, gr in zip(keys, grads, strict=True):
                        weights[k].sub_(o.eta * gr).clamp_(0.0, 1.0)
                losses.append(float(loss.detach()))
            if not first:
                break
            if len(losses) > o.num_pre_loss and np.std(losses[-o.num_pre_loss :]) < o.threshold:
                break
        return {k: v.detach().clone() for k, v in weights.items()}

    def fit(
        self,
        model: nn.Module,
        global_arrays: StateDict,
        state: ClientState,
        data: ClientData,
        ctx: FitContext,
    ) -> tuple[Update, ClientState]:
        g = sub(global_arrays, SHARED)
        if sub(state.extra, LOCAL):
            model.load_state_dict(g)
            weights = self.learn_weights(model, g, state, data, ctx)
            state = dataclasses.replace(state, extra={**state.extra, **prefixed(weights, WEIGHTS)})
        model.load_state_dict(self.combine(g, state, self.ala_keys(model)))
        opt = self.trainer.optimizer(list(model.parameters()), state.optimizers.get("fit"))
        loss = self.train(
            model,
            opt,
            data.train,
            self.cfg.train.local_epochs,
            self.loss("fit"),
            ctx.generator("fit"),
            ctx,
        )
        new_state = dataclasses.replace(
            state,
            extra={**state.extra, **prefixed(clone(model.state_dict()), LOCAL)},
            optimizers={"fit": opt.state_dict()},
        )
        update = Update(self.upload(model, data, ctx), len(data.train), {"train_loss": loss})
        return update, new_state
