"""The algorithm interface: plain objects over state dicts, independent of any runtime.

A federated method is a subclass of :class:`Algorithm` that overrides as little as it can. It
declares

* the backbone variant (``attention``) and which top-level modules are personal
  (``personal_modules``; see :mod:`fedoap.models.partition`);
* the server step (:meth:`Algorithm.aggregate`): weighted mean of the uploads by default;
* the client step (:meth:`Algorithm.fit`): load global + personal weights, train local epochs,
  upload the shared part;
* whether it has a local fine-tuning stage (:attr:`Algorithm.has_finetune`) and its loss.

Everything that crosses the network is a flat ``dict[str, Tensor]`` with namespaced keys
(``shared.<state key>``, ``kv.<name>``), exactly what a Flower ``ArrayRecord`` holds. Everything a
client keeps is a :class:`ClientState`, which never leaves the client. The in-process runner and
the Flower apps call these same methods.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from fedoap.algorithms.registry import ALGORITHMS
from fedoap.config import Config, ConfigError, check_ranges, from_dict
from fedoap.data.dataset import ClientData, Split
from fedoap.errors import DivergedError
from fedoap.federation.robust import combine
from fedoap.losses import SegLoss
from fedoap.models import FedOAPNet, Partition, StateDict
from fedoap.models.net import AttentionKind
from fedoap.models.partition import keys_of_children, sub
from fedoap.privacy import (
    CLIENT_DP_ROUNDS,
    SiteDP,
    dp_fedavg,
    dp_units,
    plan_site,
    planned_epochs,
)
from fedoap.training import make_generator, train_epochs
from fedoap.training.device import model_device
from fedoap.training.engine import LossFn, nonfinite_keys

SHARED = "shared."
KV = "kv."


@dataclass(frozen=True)
class NoOptions:
    """Methods without options of their own."""


@dataclass
class ClientState:
    """What a client keeps between rounds. Never sent."""

    personal: StateDict  # the client's personal parameters and buffers
    # Named torch optimiser state_dicts ("fit", "finetune", ...); they persist across rounds.
    optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: StateDict = field(default_factory=dict)  # method-specific tensors


@dataclass
class Update:
    """What a client sends after local training."""

    arrays: StateDict  # namespaced: shared.*, kv.*
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class FitContext:
    """Per-call facts the client step needs: where it is, and how to draw randomness."""

    client: str
    round: int  # 1-based federated round, or R + e in the fine-tuning stage
    seed: int
    progress: Callable[[int], None] | None = None
    # Where the client trains; set by the device boundary (Algorithm.run_fit) from the model.
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def generator(self, stage: str) -> torch.Generator:
        return make_generator(self.seed, stage, self.round, self.client, device=self.device)


def nbytes(arrays: StateDict) -> int:
    """Bytes of a payload as it travels (raw tensor data)."""
    return sum(t.numel() * t.element_size() for t in arrays.values())


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
    #: Whether ``privacy.dp`` / ``privacy.client_dp`` can run it: its local training is
    #: :meth:`train` with a per-example loss and no penalty, and it aggregates with this
    #: class's :meth:`aggregate` (set for the methods tested under DP). Not inherited: a
    #: subclass changes training or aggregation, so it declares its own (:meth:`dp_supported`).
    supports_dp: ClassVar[bool] = False

    @classmethod
    def dp_supported(cls) -> bool:
        return bool(cls.__dict__.get("supports_dp", False))

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        try:
            self.options = from_dict(self.Options, dict(cfg.algorithm), prefix="algorithm.")
            check_ranges(self.options, prefix="algorithm.")
        except ConfigError as err:
            raise ConfigError(f"{err} (method {self.name})") from None
        p = cfg.privacy
        for key, on in (("privacy.dp", p.dp.enabled), ("privacy.client_dp", p.client_dp.enabled)):
            if on and not self.dp_supported():
                supported = ", ".join(
                    n for n in ALGORITHMS.names() if ALGORITHMS.get(n).dp_supported()
                )
                raise ConfigError(
                    f"{key}: method {self.name} is not supported under DP yet (supported: "
                    f"{supported})"
                )
        if p.client_dp.enabled and self.name == "local":
            raise ConfigError("privacy.client_dp: method local shares nothing to noise")
        # Under DP-SGD the loss must be a mean of per-example terms (fedoap.privacy).
        self.seg_loss = SegLoss(per_image=p.dp.enabled)
        self._site_dp: dict[tuple[str, int], SiteDP] = {}

    # ------------------------------------------------------------------ structure

    def build_model(self) -> FedOAPNet:
        """The shared backbone for this method, on the CPU, initialised from the run seed (the
        process's global RNG is left as it was). :func:`fedoap.training.device.place` puts it
        on the run's device."""
        m = self.cfg.model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            return FedOAPNet(
                in_channels=self.cfg.data.channels,
                width=m.width,
                depth=m.depth,
                heads=m.heads,
                norm=m.norm,
                attention=self.attention_kind(),
                use_adapter=self.uses_adapter and m.use_adapter,
                gate=self.attention_gate(),
            )

    def attention_kind(self) -> AttentionKind:
        return self.attention

    def attention_gate(self) -> bool:
        """Whether the attention's output has a gate (:class:`fedoap.models.AttentionGate`)."""
        return False

    def site_dp(self, client: str, case_ids: np.ndarray) -> SiteDP:
        """The DP-SGD parameters of a client whose training images belong to ``case_ids``
        (``privacy.dp``), fixed for the run: planned over every epoch it may train, for its
        images or its cases (``privacy.dp.unit``; fedoap.privacy)."""
        n = dp_units(self.cfg, case_ids)
        key = (client, n)
        if key not in self._site_dp:
            epochs = planned_epochs(self.cfg, self.has_finetune, self.passes_per_round())
            self._site_dp[key] = plan_site(self.cfg, client, n, epochs)
        return self._site_dp[key]

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
        self, global_arrays: StateDict, updates: Sequence[Update], server: StateDict
    ) -> StateDict:
        """New global arrays from the round's uploads. Default: mean weighted by examples,

        ``w_{t+1} = sum_k n_k w_k / sum_k n_k``   (FedAvg, McMahan et al. 2017, Alg. 1),

        or the robust rule ``federation.aggregator`` names (:mod:`fedoap.federation.robust`).

        ``server`` is a mutable dict of tensors for server-side state (momentum buffers, ...);
        it is saved in checkpoints.
        """
        if not updates:
            return global_arrays
        f = self.cfg.federation
        keys = [k for k in updates[0].arrays if k.startswith(SHARED)]
        new = dict(global_arrays)
        cdp = self.cfg.privacy.client_dp
        if cdp.enabled:  # DP-FedAvg (fedoap.privacy): clipped, equally weighted, noised
            done = int(server.get(CLIENT_DP_ROUNDS, torch.zeros((), dtype=torch.int64)))
            gen = make_generator(self.cfg.seed, "client_dp", done + 1)
            new.update(
                dp_fedavg(
                    global_arrays, list(updates), keys, cdp.clip_norm, cdp.noise_multiplier, gen
                )
            )
            server[CLIENT_DP_ROUNDS] = torch.tensor(done + 1, dtype=torch.int64)
            return new
        new.update(
            combine(updates, keys, f.aggregator, f.trim_beta, f.byzantine, f.validate_updates)
        )
        return new

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

    def make_optimizer(
        self, params: list[nn.Parameter], state: dict[str, Any] | None, lr: float | None = None
    ) -> torch.optim.Optimizer:
        """AdamW over ``params``, resuming ``state`` (a CPU state dict) where given.

        On CUDA it is the fused implementation: one kernel for all parameters instead of a
        few per tensor (small models are launch-bound), with the same update rule."""
        t = self.cfg.train
        fused = bool(params) and params[0].is_cuda
        opt = torch.optim.AdamW(params, lr=lr or t.lr, weight_decay=t.weight_decay, fused=fused)
        if state is not None:
            opt.load_state_dict(state)
            match_layout(opt)
        return opt

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
        """``epochs`` of local training with this run's batch size, precision and augmentation.

        Parameters outside the optimiser are frozen for the call (no gradient is computed for
        them), so head-only or body-only phases cost what they should.
        """
        t = self.cfg.train
        common = (model, optimizer, split, epochs, loss_fn, gen)
        with only_these_train(model, optimizer):
            if not self.cfg.privacy.dp.enabled:
                return train_epochs(
                    *common,
                    t.batch_size,
                    t.precision,
                    augment=self.cfg.data.augment,
                    penalty=penalty,
                    progress=ctx.progress,
                )
            from fedoap.training.dp import dp_train_epochs

            if penalty is not None:  # supports_dp methods have none
                raise ConfigError(f"privacy.dp: method {self.name} trains with a penalty")
            return dp_train_epochs(
                *common,
                self.site_dp(ctx.client, split.case_ids),
                t.precision,
                augment=self.cfg.data.augment,
                progress=ctx.progress,
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
        opt = self.make_optimizer(self.trainable(model, "fit"), state.optimizers.get("fit"))
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

    # ------------------------------------------------------------------ device boundary

    def run_fit(
        self,
        model: nn.Module,
        global_arrays: StateDict,
        state: ClientState,
        data: ClientData,
        ctx: FitContext,
    ) -> tuple[Update, ClientState]:
        """:meth:`fit` on the model's device: what the runtimes call.

        What the client receives (global arrays, its own state) goes to the model's device; what
        it sends (the upload) and keeps between rounds (its state) comes back as contiguous CPU
        fp32 tensors. Uploads are therefore the same tensors and bytes whatever device a site
        trains on, and aggregation never sees a device.
        """
        args = on_device(model, global_arrays, state, data, ctx)
        with self.divergence_guard(ctx, "fit"):
            update, new = self.fit(model, *args)
        cpu = torch.device("cpu")
        upload = Update(to_device(update.arrays, cpu), update.num_examples, update.metrics)
        new = state_to(new, cpu)
        # Every method's loop ends in train_epochs' check; this one also covers what a method
        # computes after it (uploads, KV summaries, personal state) and its own loops.
        self.check_finite(ctx, "fit", update.metrics.get("train_loss"), upload.arrays, new)
        return upload, new

    def run_finetune_epoch(
        self,
        model: nn.Module,
        global_arrays: StateDict,
        state: ClientState,
        data: ClientData,
        ctx: FitContext,
        first: bool,
    ) -> tuple[float, ClientState]:
        """:meth:`finetune_epoch` on the model's device (see :meth:`run_fit`)."""
        args = on_device(model, global_arrays, state, data, ctx)
        with self.divergence_guard(ctx, "finetune"):
            loss, new = self.finetune_epoch(model, *args, first)
        new = state_to(new, torch.device("cpu"))
        self.check_finite(ctx, "finetune", loss, {}, new)
        return loss, new

    # ------------------------------------------------------------------ divergence

    def lr_key(self, stage: str) -> str:
        """The config key of the learning rate a stage trains with."""
        if stage == "finetune" and self.cfg.finetune.lr is not None:
            return "finetune.lr"
        return "train.lr"

    def diverged(self, ctx: FitContext, stage: str, detail: str, step: int | None) -> DivergedError:
        """The error for a client whose training stopped being finite: where, and what to try."""
        key = self.lr_key(stage)
        lr = self.cfg.finetune.lr if key == "finetune.lr" else self.cfg.train.lr
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
    def divergence_guard(self, ctx: FitContext, stage: str) -> Iterator[None]:
        """Give a :class:`DivergedError` from the training loop its client, round and advice."""
        try:
            yield
        except DivergedError as err:
            if err.client is not None:
                raise
            raise self.diverged(ctx, stage, err.detail, err.step) from None

    def check_finite(
        self,
        ctx: FitContext,
        stage: str,
        loss: float | None,
        upload: StateDict,
        state: ClientState,
    ) -> None:
        """Raise :class:`DivergedError` if the loss, the upload or the kept state is not finite."""
        if loss is not None and not math.isfinite(loss):
            raise self.diverged(ctx, stage, f"the mean training loss is {loss}", None)
        parts = {"upload": upload, "personal state": state.personal, "extra state": state.extra}
        for what, arrays in parts.items():
            bad = nonfinite_keys(arrays)
            if bad:
                raise self.diverged(
                    ctx,
                    stage,
                    f"{len(bad)} tensor(s) of its {what} are not finite ({bad[0]})",
                    None,
                )

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
        opt = self.make_optimizer(
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


def clone(state: StateDict) -> StateDict:
    return {k: v.detach().clone() for k, v in state.items()}


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


def match_layout(opt: torch.optim.Optimizer) -> None:
    """Give loaded optimiser moments their parameter's memory format (channels_last weights get
    channels_last moments), as a fresh optimiser would have them."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


@contextlib.contextmanager
def only_these_train(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on parameters the optimiser does not update."""
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    frozen = [p for p in model.parameters() if id(p) not in in_opt and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
