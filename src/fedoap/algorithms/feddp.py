"""FedDP: Wang, Jin, Chen, Zhao, Heng, Dou, "Dual Personalization for Federated Medical Image
Segmentation" (IEEE TMI 2023; public code jcwang123/FedDP). The closest prior art to FedOAP.

1. Federated stage: the same U-Net with bottleneck **self**-attention (``attention="self"``:
   queries, keys and values all from the one bottleneck). Only the query projection
   ``query_proj`` is personal; everything else is averaged as in FedAvg.
2. Fine-tuning stage, *inter-site guided calibration*: each client fine-tunes its whole model on

       L = L_seg(z, y) + lambda * mean( U * BCE(z, y) ),
       U = std_j sigma(f_j(x)) / max std

   where f_j are the models of all sites j (the final shared weights with site j's query
   projection, frozen when fine-tuning starts) and the std is taken per pixel over sites. Pixels
   on which the sites disagree get a larger BCE weight.

Departures from the public code: the segmentation term is this project's ``L_seg`` (0.5 BCE +
soft Dice) instead of plain Dice, so that every method optimises the same base loss; the
backbone is this project's U-Net instead of the FPN/PVT used there.

Communication: after the federated stage the server collects each site's query projection and
sends all of them to every site (``finetune_payload``) -- the method's design, and a one-off
exception to "personal parameters never leave the client" that FedOAP does not need.

Config keys: ``algorithm.lam`` (lambda, default 1.0), ``finetune.*``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedoap.algorithms.base import Algorithm
from fedoap.algorithms.registry import ALGORITHMS
from fedoap.basetypes import SHARED, ClientState
from fedoap.config import ranged
from fedoap.models import StateDict
from fedoap.models.partition import sub
from fedoap.training import autocast
from fedoap.training.device import model_device
from fedoap.training.engine import LossFn

SITES = "sites/"


@dataclass(frozen=True)
class FedDPOptions:
    lam: float = ranged(1.0, ge=0)


@ALGORITHMS.register("feddp")
class FedDP(Algorithm):
    name = "feddp"
    Options = FedDPOptions
    attention = "self"
    personal_modules = ("query_proj",)
    has_finetune = True
    sends_personal_models = True

    def finetune_payload(
        self, global_arrays: StateDict, states: dict[str, ClientState]
    ) -> StateDict:
        return {
            f"{SITES}{name}/{k}": v.clone()
            for name, st in sorted(states.items())
            for k, v in st.personal.items()
        }

    def site_models(self, model: nn.Module, payload: StateDict) -> list[nn.Module]:
        """Every site's model: final shared weights + that site's query projection, frozen."""
        shared = sub(payload, SHARED)
        per_site: dict[str, StateDict] = {}
        for key, v in payload.items():
            if key.startswith(SITES):
                site, k = key[len(SITES) :].split("/", 1)
                per_site.setdefault(site, {})[k] = v
        device = model_device(model)
        models = []
        for site in sorted(per_site):
            # A fresh eager module, not a copy of ``model``: a deep copy of a compiled module
            # would still call the original's compiled forward.
            m = self.build_model()
            m.load_state_dict({**shared, **per_site[site]})
            m.to(device).eval().requires_grad_(False)
            models.append(m)
        return models

    def finetune_loss(self, model: nn.Module, global_arrays: StateDict) -> LossFn:
        sites = self.site_models(model, global_arrays)
        lam, seg, precision = self.options.lam, self.seg_loss, self.cfg.train.precision

        def loss(
            z: torch.Tensor, y: torch.Tensor, gen: torch.Generator, x: torch.Tensor
        ) -> torch.Tensor:
            with torch.no_grad(), autocast(precision, x.device.type):
                preds = torch.stack([torch.sigmoid(m(x).float()) for m in sites])  # (K, B, 1, H, W)
            u = preds.float().std(0)  # per-pixel disagreement between sites
            top = u.max()
            u = torch.where(top > 0, u / top.clamp_min(1e-12), u)  # no host read-back per batch
            bce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
            return seg(z, y) + lam * (u * bce).mean()

        return loss
