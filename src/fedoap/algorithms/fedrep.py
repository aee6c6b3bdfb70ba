"""FedRep: Collins et al., "Exploiting Shared Representations for Personalized Federated
Learning", ICML 2021.

A personal ``head`` and a shared body. Each round the client first trains the head alone for
``head_epochs`` (body frozen), then the body alone for ``train.local_epochs`` (head frozen), and
uploads the body; the server averages bodies as FedAvg does.

Departure from the paper: the paper runs many head epochs per body epoch; on a CPU budget the
default is one head epoch. Head-only epochs skip the backward pass through the body, so each
costs about a forward pass; they come on top of the shared budget of ``local_epochs``.

Config keys: ``algorithm.head_epochs`` (default 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fedoap.algorithms.base import Algorithm, FitContext
from fedoap.algorithms.registry import ALGORITHMS
from fedoap.basetypes import ClientState, Update
from fedoap.config import ranged
from fedoap.data.dataset import ClientData
from fedoap.models import StateDict


@dataclass(frozen=True)
class FedRepOptions:
    head_epochs: int = ranged(1, ge=1, le=10_000)


@ALGORITHMS.register("fedrep")
class FedRep(Algorithm):
    name = "fedrep"
    Options = FedRepOptions
    personal_modules = ("head",)

    def passes_per_round(self) -> int:
        return self.cfg.train.local_epochs + self.options.head_epochs

    def fit(
        self,
        model: nn.Module,
        global_arrays: StateDict,
        state: ClientState,
        data: ClientData,
        ctx: FitContext,
    ) -> tuple[Update, ClientState]:
        self.load(model, global_arrays, state)
        personal = set(self.partition(model).personal)
        head = [p for k, p in model.named_parameters() if k in personal]
        body = [p for k, p in model.named_parameters() if k not in personal]
        loss_fn = self.loss("fit")
        opt_head = self.trainer.optimizer(head, state.optimizers.get("head"))
        self.train(
            model,
            opt_head,
            data.train,
            self.options.head_epochs,
            loss_fn,
            ctx.generator("fit-head"),
            ctx,
        )
        opt_body = self.trainer.optimizer(body, state.optimizers.get("fit"))
        loss = self.train(
            model,
            opt_body,
            data.train,
            self.cfg.train.local_epochs,
            loss_fn,
            ctx.generator("fit"),
            ctx,
        )
        update = Update(self.upload(model, data, ctx), len(data.train), {"train_loss": loss})
        return update, self.save_state(model, {"head": opt_head, "fit": opt_body}, state)
