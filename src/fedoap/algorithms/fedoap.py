"""FedOAP: Tashdeed, Rahman, Islam, Hossain, "FedOAP: Organ Agnostic Tumor Segmentation Using
Personalized Federated Learning", arXiv 2511.18847 (2025). Specification: docs/method.md.

Network (client k): shared encoder; personal query bottleneck ``B_q^k`` and projection ``W_q^k``;
shared K/V bottleneck ``B_kv`` with ``W_k, W_v, W_o``; decoupled cross-attention

    h = Norm(W_o softmax(W_q^k B_q^k(f) (W_k B_kv(f))^T / sqrt(d)) W_v B_kv(f) + B_q^k(f));

shared decoder; personal spatial adapter ``A^k`` and head.

Protocol: R rounds of E local epochs on ``L_seg`` with the shared part averaged by training
examples, then ``finetune.epochs`` of local fine-tuning with the perturbed boundary loss (PBL),
with per-client model selection on validation.

K/V aggregation (``model.kv.mode``):

* ``weights`` -- the shared K/V weights are averaged; keys/values come from each image's own tokens.
* ``bank`` -- in addition each client uploads ``kv.summary``: a bounded statistic of its
  pre-projection K/V tokens over (up to ``summary_images`` of) its training images, either
  ``bank_size`` k-means prototypes (server concatenates them: a K*bank_size-token bank) or the
  per-position token mean (server averages them by example count). The merged ``kv.bank`` is
  broadcast and every client's queries attend to ``[own tokens ; bank]``. The bank is computed
  with the client's weights at the end of its local epochs and used in the next round.

Config keys: ``model.use_dca``, ``model.use_adapter``, ``model.heads``, ``model.kv.*``,
``finetune.epochs``, ``finetune.parts``, ``finetune.pbl.*``, and two options for sites with few
patients (both off by default, which is the method as published):

* ``algorithm.gate``: a personal per-channel gate on the attention's output, initialised at zero,
  ``h = Norm(g^k * W_o softmax(...) V + B_q^k(f))`` (:class:`fedoap.models.AttentionGate`);
* ``algorithm.ft_prox``: a proximal term ``(mu / 2) ||theta - theta_0||^2`` in the fine-tuning
  loss, pulling each site's model towards the federated model it started fine-tuning from
  (theta_0), as Ditto (Li et al., ICML 2021) pulls its personal model towards the global one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedoap.aggregation import Aggregation
from fedoap.algorithms.base import Algorithm, FitContext
from fedoap.algorithms.registry import ALGORITHMS
from fedoap.basetypes import KV, ClientState, StateDict, Update
from fedoap.config import Config, ConfigError, KVConfig, ranged
from fedoap.data.dataset import ClientData
from fedoap.losses import PerturbedBoundaryLoss
from fedoap.models import FedOAPNet
from fedoap.models.net import AttentionKind
from fedoap.models.partition import sub
from fedoap.training import autocast
from fedoap.training.engine import LossFn

BANK = KV + "bank"
SUMMARY = KV + "summary"
#: Where a site keeps theta_0, the model its fine-tuning started from (``algorithm.ft_prox``).
ANCHOR = "finetune_anchor/"


@dataclass(frozen=True)
class FedOAPOptions:
    # A personal, zero-initialised per-channel gate on the attention's output.
    gate: bool = False
    # mu of the fine-tuning stage's proximal term towards the federated model (0: none).
    ft_prox: float = ranged(0.0, ge=0)


@ALGORITHMS.register("fedoap")
class FedOAP(Algorithm):
    name = "fedoap"
    Options = FedOAPOptions
    uses_adapter = True
    personal_modules = ("bottleneck", "query_proj", "gate", "adapter", "head")
    has_finetune = True
    supports_dp = True

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        if self.options.ft_prox and cfg.privacy.dp.enabled:
            raise ConfigError(
                "algorithm.ft_prox: DP-SGD clips per-example gradients of the loss alone; a "
                "proximal term is not supported under privacy.dp"
            )

    def attention_kind(self) -> AttentionKind:
        return "cross" if self.cfg.model.use_dca else "none"

    def attention_gate(self) -> bool:
        return self.options.gate

    # ---------------------------------------------------------------- fine-tuning

    def start_finetune(self, best_weights: StateDict, state: ClientState) -> ClientState:
        new = super().start_finetune(best_weights, state)
        if self.options.ft_prox:  # theta_0: the federated model fine-tuning starts from
            anchor = {ANCHOR + k: v.detach().clone() for k, v in best_weights.items()}
            new.extra = {**new.extra, **anchor}
        return new

    def finetune_penalty(
        self, model: nn.Module, state: ClientState
    ) -> Callable[[], torch.Tensor] | None:
        mu = self.options.ft_prox
        if not mu:
            return None
        anchor = sub(state.extra, ANCHOR)
        pairs = [(p, anchor[k]) for k, p in model.named_parameters() if p.requires_grad]
        return lambda: mu / 2 * sum(((p - a) ** 2).sum() for p, a in pairs)  # type: ignore[return-value]

    @property
    def bank_mode(self) -> bool:
        return self.cfg.model.use_dca and self.cfg.model.kv.mode == "bank"

    # ---------------------------------------------------------------- losses

    def loss(self, stage: str) -> LossFn:
        pbl = self.cfg.finetune.pbl
        if stage != "finetune" or not pbl.enabled:
            return super().loss(stage)
        fn = PerturbedBoundaryLoss(
            pbl.region, pbl.tau, pbl.s, pbl.lam, pbl.band_width, self.seg_loss
        )
        return lambda z, y, gen, x: fn(z, y, gen)

    # ---------------------------------------------------------------- K/V bank

    def load(self, model: nn.Module, global_arrays: StateDict, state: ClientState) -> None:
        super().load(model, global_arrays, state)
        assert isinstance(model, FedOAPNet)
        model.set_kv_bank(global_arrays.get(BANK) if self.bank_mode else None)

    def upload(self, model: nn.Module, data: ClientData, ctx: FitContext) -> StateDict:
        arrays = super().upload(model, data, ctx)
        if self.bank_mode:
            assert isinstance(model, FedOAPNet)
            arrays[SUMMARY] = kv_summary(
                model,
                data.train.x,
                self.cfg.model.kv,
                ctx.generator("kv-summary"),
                self.cfg.train.precision,
            )
        return arrays

    def upload_template(self, model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        template = super().upload_template(model)
        if self.bank_mode:
            assert isinstance(model, FedOAPNet)
            d = self.cfg.data
            with torch.no_grad():  # one blank image through the encoder: the token grid (N, C)
                p = next(model.parameters())
                x = torch.zeros(1, d.channels, d.image_size, d.image_size, device=p.device)
                _, n, c = model.kv_tokens(x).shape
            kv = self.cfg.model.kv
            rows = kv.bank_size if kv.summary == "kmeans" else n
            template[SUMMARY] = ((rows, c), torch.float32)
        return template

    def aggregate(
        self,
        global_arrays: StateDict,
        updates: Sequence[Update],
        server: StateDict,
        policy: Aggregation,
    ) -> StateDict:
        new = super().aggregate(global_arrays, updates, server, policy)
        if self.bank_mode and updates:
            summaries = [u.arrays[SUMMARY] for u in updates]
            if self.cfg.model.kv.summary == "kmeans":
                new[BANK] = torch.cat(summaries, dim=0)  # (K * bank_size, C)
            else:  # per-position token means: one more tensor to combine, by the same rule
                new[BANK] = policy.combine(updates, [SUMMARY])[SUMMARY]
        return new


@torch.no_grad()
def kv_summary(
    model: FedOAPNet, x: torch.Tensor, cfg: KVConfig, gen: torch.Generator, precision: str
) -> torch.Tensor:
    """A bounded statistic of the client's K/V tokens over its training images.

    Returns (bank_size, C) k-means prototypes or the (N, C) per-position mean; never per-image
    tokens. Size in bytes: rows * C * 4, independent of the number of images.
    """
    model.eval()
    n = x.shape[0]
    idx = torch.randperm(n, generator=gen, device=gen.device)[: cfg.summary_images]
    tokens = []
    for s in range(0, len(idx), 64):
        with autocast(precision, x.device.type):
            tokens.append(model.kv_tokens(x[idx[s : s + 64]]).float())
    t = torch.cat(tokens)  # (n_img, N, C)
    if cfg.summary == "token_mean":
        return t.mean(0)
    return kmeans(t.reshape(-1, t.shape[-1]), cfg.bank_size, cfg.kmeans_iters, gen)


def kmeans(points: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; returns (k, C) centroids (repeats if n < k)."""
    n = points.shape[0]
    first = int(torch.randint(n, (1,), generator=gen, device=gen.device))
    centroids = [points[first]]
    d2 = ((points - centroids[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / n)
        nxt = int(torch.multinomial(probs, 1, generator=gen))
        centroids.append(points[nxt])
        d2 = torch.minimum(d2, ((points - points[nxt]) ** 2).sum(1))
    c = torch.stack(centroids)  # (k, C)
    for _ in range(iters):
        assign = torch.cdist(points, c).argmin(1)  # (n,)
        sums = torch.zeros_like(c).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c)
    return c
