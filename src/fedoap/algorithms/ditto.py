"""Ditto: Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021.

Two models per client. The global model ``w`` is trained exactly as in FedAvg (``local_epochs``
from the broadcast ``w_t``, uploaded, averaged). The personal model ``v_k`` never leaves the
client and is trained for ``local_epochs`` on

    L_seg(v_k) + (lambda / 2) ||v_k - w_t||^2

The personal model is the one validated, selected and tested. With ``lambda = 0`` it is exactly
``local`` training (same data order, same optimiser; tested).

Budget: two local passes per round (global + personal), twice FedAvg's compute; the paper's
protocol. No fine-tuning stage.

Config keys: ``algorithm.lam`` (lambda, default 0.1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from fedoap.algorithms.base import Algorithm, FitContext
from fedoap.algorithms.registry import ALGORITHMS
from fedoap.basetypes import SHARED, ClientState, Update, clone
from fedoap.config import ranged
from fedoap.data.dataset import ClientData
from fedoap.models import StateDict
from fedoap.models.partition import prefixed, sub

PERSONAL = "personal/"


@dataclass(frozen=True)
class DittoOptions:
    lam: float = ranged(0.1, ge=0)


@ALGORITHMS.register("ditto")
class Ditto(Algorithm):
    name = "ditto"
    Options = DittoOptions

    def passes_per_round(self) -> int:
        return 2 * self.cfg.train.local_epochs

    def init_client(self, model: nn.Module) -> ClientState:
        state = super().init_client(model)
        state.extra = prefixed(clone(model.state_dict()), PERSONAL)
        return state

    def personalize(self, model: nn.Module, global_arrays: StateDict, state: ClientState) -> None:
        model.load_state_dict(sub(state.extra, PERSONAL))

    def fit(
        self,
        model: nn.Module,
        global_arrays: StateDict,
        state: ClientState,
        data: ClientData,
        ctx: FitContext,
    ) -> tuple[Update, ClientState]:
        epochs, loss_fn = self.cfg.train.local_epochs, self.loss("fit")
        # 1. The global model: FedAvg's local update.
        self.load(model, global_arrays, state)
        opt_global = self.trainer.optimizer(
            list(model.parameters()), state.optimizers.get("global")
        )
        self.train(model, opt_global, data.train, epochs, loss_fn, ctx.generator("fit-global"), ctx)
        upload = self.upload(model, data, ctx)
        # 2. The personal model, pulled towards the global model it received.
        model.load_state_dict(sub(state.extra, PERSONAL))
        opt = self.trainer.optimizer(list(model.parameters()), state.optimizers.get("fit"))
        penalty = None
        if self.options.lam:
            lam = self.options.lam
            params = dict(model.named_parameters())
            anchors = [
                (params[k[len(SHARED) :]], v)
                for k, v in global_arrays.items()
                if k[len(SHARED) :] in params
            ]
            penalty = lambda: lam / 2 * sum(((p - g) ** 2).sum() for p, g in anchors)  # noqa: E731
        loss = self.train(
            model, opt, data.train, epochs, loss_fn, ctx.generator("fit"), ctx, penalty
        )  # type: ignore[arg-type]
        new_state = dataclasses.replace(
            state,
            extra=prefixed(clone(model.state_dict()), PERSONAL),
            optimizers={"global": opt_global.state_dict(), "fit": opt.state_dict()},
        )
        return Update(upload, len(data.train), {"train_loss": loss}), new_state
