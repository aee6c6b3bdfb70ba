"""The algorithm interface: a federated method's hooks over state dicts, independent of any
runtime.

A federated method is a subclass of :class:`Algorithm` that overrides as little as it can. It
declares

* the backbone variant (``attention``) and which top-level modules are personal
  (``personal_modules``; see :mod:`fedoap.models.partition`);
* its capabilities, as class attributes (``has_finetune``, ``supports_dp``, ``pooled``,
  ``sends_personal_models``, ``breaks_privacy``);
* the server step (:meth:`Algorithm.aggregate`): the server's aggregation policy over the
  uploads by default;
* the client step (:meth:`Algorithm.fit`): load global + personal weights, train local epochs,
  upload the shared part;
* its fine-tuning stage and its loss.

What crosses the network and what a client keeps are the shared types of :mod:`fedoap.basetypes`.
Local training (plain or DP-SGD) is the :class:`~fedoap.training.local.LocalTrainer`'s job; the
device boundary and divergence handling are the site's (:mod:`fedoap.federation.boundary`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from fedoap.aggregation import Aggregation
from fedoap.algorithms.registry import check_privacy
from fedoap.basetypes import SHARED, ClientState, StateDict, Update, clone
from fedoap.config import Config, ConfigError, check_ranges, from_dict
from fedoap.data.dataset import ClientData, Split
from fedoap.losses import SegLoss
from fedoap.models import FedOAPNet, Partition
from fedoap.models.net import AttentionKind, build_net
from fedoap.models.partition import keys_of_children, sub
from fedoap.privacy import planned_epochs
from fedoap.training import make_generator
from fedoap.training.engine import LossFn
from fedoap.training.local import LocalTrainer


@dataclass(frozen=True)
class NoOptions:
    """Methods without options of their own."""


@dataclass
class FitContext:
    """Per-call facts the client step needs: where it is, and how to draw randomness."""

    client: str
    round: int  # 1-based federated round, or R + e in the fine-tuning stage
    seed: int
    progress: Callable[[int], None] | None = None
    # Where the client trains; set by the device boundary (federation.boundary) from the model.
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def generator(self, stage: str) -> torch.Generator:
        return make_generator(self.seed, stage, self.round, self.client, device=self.device)


class Algorithm:
    """Base class. With no overrides it is FedAvg on the plain U-Net (McMahan et al., 2017)."""

    name: ClassVar[str] = "base"
    Options: ClassVar[type] = NoOptions
    #: Backbone variant; every method uses the same encoder/decoder/width.
    attention: ClassVar[AttentionKind] = "none"
    #: Whether the spatial adapter exists (FedOAP only; model.use_adapter can switch it off).
    uses_adapter: ClassVar[bool] = False
    #: Top-level modules of FedOAPNet that stay on the client.
    personal_modules: ClassVar[tuple[str, ...]] = ()
    #: Local fine-tuning stage after the federated rounds (finetune.epochs of it).
    has_finetune: ClassVar[bool] = False
    #: Whether it is a privacy-breaking reference point rather than a federated method.
    breaks_privacy: ClassVar[bool] = False
    #: Train one model on the pooled training sets instead of per client (``centralized``).
    pooled: ClassVar[bool] = False
    #: Whether sites send model weights at all (``local``: nothing).
    shares_weights: ClassVar[bool] = True
    #: Whether ``privacy.dp`` / ``privacy.client_dp`` can run it: it trains with :meth:`train`,
    #: a per-example loss and no penalty, and aggregates with the server's policy alone. A
    #: subclass that changes training or aggregation declares ``False`` again.
    supports_dp: ClassVar[bool] = False
    #: Whether its fine-tuning needs every site's own model (FedDP's :meth:`finetune_payload`):
    #: only a transport that holds the sites' states can run it.
    sends_personal_models: ClassVar[bool] = False

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        try:
            self.options = from_dict(self.Options, dict(cfg.algorithm), prefix="algorithm.")
            check_ranges(self.options, prefix="algorithm.")
        except ConfigError as err:
            raise ConfigError(f"{err} (method {self.name})") from None
        check_privacy(type(self), cfg)
        # Under DP-SGD the loss must be a mean of per-example terms (fedoap.privacy).
        self.seg_loss = SegLoss(per_image=cfg.privacy.dp.enabled)
        epochs = planned_epochs(cfg, self.has_finetune, self.passes_per_round())
        self.trainer = LocalTrainer(cfg, epochs)

    # ------------------------------------------------------------------ structure

    def build_model(self) -> FedOAPNet:
        """The method's backbone on the CPU, initialised from the run seed (:func:`build_net`)."""
        adapter = self.uses_adapter and self.cfg.model.use_adapter
        return build_net(self.cfg, self.attention_kind(), adapter, self.attention_gate())

    def attention_kind(self) -> AttentionKind:
        return self.attention

    def attention_gate(self) -> bool:
        """Whether the attention's output has a gate (:class:`fedoap.models.AttentionGate`)."""
        return False

    def passes_per_round(self) -> int:
        """Passes over the local training set per round (for progress bars and budgets)."""
        return self.cfg.train.local_epochs

    def personal_keys(self, model: nn.Module) -> set[str]:
        """State-dict keys that stay on the client, from module structure."""
        return keys_of_children(model, self.personal_modules)

    def partition(self, model: nn.Module) -> Partition:
        return Partition.from_personal(model, self.personal_keys(model))

    # ------------------------------------------------------------------ server

    def init_global(self, model: nn.Module) -> StateDict:
        """Initial broadcast: the shared part of the freshly initialised model."""
        shared, _ = self.partition(model).split(model.state_dict())
        return {SHARED + k: v.detach().clone() for k, v in shared.items()}

    def upload_template(self, model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every key of a client's upload with its shape and dtype: what the server accepts
        (``fedoap.federation.protocol.check_upload``). Default: the shared part."""
        return {k: (tuple(v.shape), v.dtype) for k, v in self.init_global(model).items()}

    def aggregate(
        self,
        global_arrays: StateDict,
        updates: Sequence[Update],
        server: StateDict,
        policy: Aggregation,
    ) -> StateDict:
        """New global arrays from the round's uploads. Default: the server's policy over the
        shared part (``federation.aggregator``, or DP-FedAvg under ``privacy.client_dp``:
        :mod:`fedoap.aggregation`); with the ``mean`` rule that is FedAvg,

        ``w_{t+1} = sum_k n_k w_k / sum_k n_k``   (McMahan et al. 2017, Alg. 1).

        ``server`` is a mutable dict of tensors for server-side state (momentum buffers, ...);
        it is saved in checkpoints.
        """
        if not updates:
            return global_arrays
        return {**global_arrays, **policy(global_arrays, updates, server)}

    # ------------------------------------------------------------------ client

    def init_client(self, model: nn.Module) -> ClientState:
        _, personal = self.partition(model).split(model.state_dict())
        return ClientState(personal=clone(personal))

    def load(self, model: nn.Module, global_arrays: StateDict, state: ClientState) -> None:
        """Put global shared weights and the client's personal weights into ``model``."""
        shared = sub(global_arrays, SHARED)
        missing = set(self.partition(model).shared) - set(shared) - set(state.personal)
        if missing:
            raise ValueError(f"global payload lacks shared keys, e.g. {sorted(missing)[:3]}")
        model.load_state_dict({**shared, **state.personal}, strict=True)

    def personalize(self, model: nn.Module, global_arrays: StateDict, state: ClientState) -> None:
        """Load the model this client would deploy now (what validation and test score)."""
        self.load(model, global_arrays, state)

    def trainable(self, model: nn.Module, stage: str) -> list[nn.Parameter]:
        """Parameters the optimiser updates in a stage (``"fit"`` or ``"finetune"``)."""
        if stage == "finetune" and self.cfg.finetune.parts == "personal":
            personal = set(self.partition(model).personal)
            return [p for k, p in model.named_parameters() if k in personal]
        return list(model.parameters())

    def loss(self, stage: str) -> LossFn:
        """Training loss for a stage. Default: ``L_seg`` everywhere."""
        seg = self.seg_loss
        return lambda z, y, gen, x: seg(z, y)

    def penalty(
        self, model: nn.Module, global_arrays: StateDict, state: ClientState
    ) -> Callable[[], torch.Tensor] | None:
        """Optional regulariser added to the local loss (FedProx, Ditto)."""
        return None

    def upload(self, model: nn.Module, data: ClientData, ctx: FitContext) -> StateDict:
        shared, _ = self.partition(model).split(model.state_dict())
        return {SHARED + k: v for k, v in clone(shared).items()}

    def save_state(
        self, model: nn.Module, optimizers: dict[str, torch.optim.Optimizer], state: ClientState
    ) -> ClientState:
        _, personal = self.partition(model).split(model.state_dict())
        return dataclasses.replace(
            state,
            personal=clone(personal),
            optimizers={**state.optimizers, **{k: o.state_dict() for k, o in optimizers.items()}},
        )

    def train(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        split: Split,
        epochs: int,
        loss_fn: LossFn,
        gen: torch.Generator,
        ctx: FitContext,
        penalty: Callable[[], torch.Tensor] | None = None,
    ) -> float:
        """``epochs`` of local training by the site's :class:`LocalTrainer` (plain, or DP-SGD
        under ``privacy.dp``) with this run's batch size, precision and augmentation."""
        return self.trainer.train(
            model, optimizer, split, epochs, loss_fn, gen, ctx.client, ctx.progress, penalty
        )

    def fit(
        self,
        model: nn.Module,
        global_arrays: StateDict,
        state: ClientState,
        data: ClientData,
        ctx: FitContext,
    ) -> tuple[Update, ClientState]:
        """One round of local training. Returns the upload and the client's new state."""
        self.load(model, global_arrays, state)
        opt = self.trainer.optimizer(self.trainable(model, "fit"), state.optimizers.get("fit"))
        penalty = self.penalty(model, global_arrays, state)
        loss = self.train(
            model,
            opt,
            data.train,
            self.cfg.train.local_epochs,
            self.loss("fit"),
            ctx.generator("fit"),
            ctx,
            penalty,
        )
        arrays = self.upload(model, data, ctx)
        update = Update(arrays, len(data.train), {"train_loss": loss})
        return update, self.save_state(model, {"fit": opt}, state)

    # ------------------------------------------------------------------ fine-tuning

    def finetune_payload(
        self, global_arrays: StateDict, states: dict[str, ClientState]
    ) -> StateDict:
        """Extra arrays every client receives for the fine-tuning stage (FedDP: the other
        sites' models). Called once, after the last round. Default: nothing."""
        return {}

    def start_finetune(self, best_weights: StateDict, state: ClientState) -> ClientState:
        """The client's state at the start of fine-tuning: its best validated model, whole."""
        return ClientState(personal=dict(best_weights), extra=state.extra)

    def finetune_epoch(
        self,
        model: nn.Module,
        global_arrays: StateDict,
        state: ClientState,
        data: ClientData,
        ctx: FitContext,
        first: bool,
    ) -> tuple[float, ClientState]:
        """One epoch of the local fine-tuning stage (a fresh optimiser at the first epoch)."""
        self.personalize(model, global_arrays, state)
        opt = self.trainer.optimizer(
            self.trainable(model, "finetune"),
            None if first else state.optimizers.get("finetune"),
            lr=self.cfg.finetune.lr,
        )
        loss = self.train(
            model,
            opt,
            data.train,
            1,
            self.finetune_loss(model, global_arrays),
            ctx.generator("finetune"),
            ctx,
            self.finetune_penalty(model, state),
        )
        return loss, self.finetune_state(model, opt, state)

    def finetune_penalty(
        self, model: nn.Module, state: ClientState
    ) -> Callable[[], torch.Tensor] | None:
        """Optional regulariser of the fine-tuning loss (FedOAP's ``algorithm.ft_prox``)."""
        return None

    def finetune_loss(self, model: nn.Module, global_arrays: StateDict) -> LossFn:
        return self.loss("finetune")

    def finetune_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: ClientState
    ) -> ClientState:
        """After fine-tuning the *whole* model is the client's own: it is all personal now."""
        return dataclasses.replace(
            state,
            personal=clone(model.state_dict()),
            optimizers={"finetune": optimizer.state_dict()},
        )
