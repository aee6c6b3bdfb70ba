"""Simulated attacks, for measuring defences only (``federation.attack``).

An attacking site (:class:`AttackingSite`, which :func:`make_site` builds for the clients
``federation.attack.clients`` names) runs the protocol like any other and poisons what it sends:

- ``nan``: every floating tensor of its upload is NaN;
- ``scale``: its update ``u - g`` (upload minus the global arrays it started from) times
  :data:`SCALE`;
- ``sign_flip``: its update negated, ``g - (u - g)``;
- ``noise``: Gaussian noise with the norm of its update, instead of the update;
- ``invert_masks``: it trains honestly on inverted training masks (data poisoning); its upload
  is not touched.

Model poisoning applies to the shared keys (``shared.*``); a K/V summary is sent as trained.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import torch

from fedoap.algorithms import Algorithm
from fedoap.basetypes import SHARED, StateDict, Update
from fedoap.config import Config
from fedoap.data.dataset import ClientData, Split
from fedoap.federation.site import Site
from fedoap.federation.state import SiteState
from fedoap.models import FedOAPNet
from fedoap.training.device import Timer

#: The factor of the ``scale`` attack.
SCALE = 1000.0


def make_site(
    cfg: Config,
    alg: Algorithm,
    model: FedOAPNet,
    data: ClientData,
    record: SiteState,
    timer: Timer,
    **options: Any,
) -> Site:
    """The site of ``data``: an :class:`AttackingSite` where ``federation.attack.clients`` names
    it, an honest :class:`~fedoap.federation.site.Site` otherwise (``options``: the site's)."""
    if data.name in cfg.federation.attack.clients:
        return AttackingSite(cfg, alg, model, data, record, timer, **options)
    return Site(cfg, alg, model, data, record, timer, **options)


class AttackingSite(Site):
    """A site that follows the protocol and poisons what it sends (``federation.attack.kind``):
    its upload after each round's honest training, or its training masks once, at the start
    (``invert_masks``)."""

    def __init__(
        self,
        cfg: Config,
        alg: Algorithm,
        model: FedOAPNet,
        data: ClientData,
        record: SiteState,
        timer: Timer,
        **options: Any,
    ) -> None:
        self.kind = cfg.federation.attack.kind
        if self.kind == "invert_masks":
            data = invert_training_masks(data)
        super().__init__(cfg, alg, model, data, record, timer, **options)

    def _fit(self, rnd: int, global_arrays: StateDict) -> Update:
        update = super()._fit(rnd, global_arrays)
        return poison_update(update, global_arrays, self.kind, self.cfg.seed, rnd, self.name)


def poison_update(
    update: Update, global_arrays: StateDict, kind: str, seed: int, rnd: int, site: str
) -> Update:
    """The upload an attacking ``site`` sends in round ``rnd`` instead of ``update``."""
    if kind == "invert_masks":
        return update
    keys = [
        k
        for k, v in update.arrays.items()
        if k.startswith(SHARED) and v.is_floating_point() and k in global_arrays
    ]
    out = dict(update.arrays)
    start = {k: global_arrays[k].double().to(update.arrays[k].device) for k in keys}  # g
    deltas = {k: update.arrays[k].double() - start[k] for k in keys}  # u - g
    if kind == "nan":
        for k in keys:
            out[k] = torch.full_like(update.arrays[k], float("nan"))
    elif kind in ("scale", "sign_flip"):
        factor = SCALE if kind == "scale" else -1.0
        for k in keys:
            out[k] = (start[k] + factor * deltas[k]).to(update.arrays[k].dtype)
    elif kind == "noise":
        gen = torch.Generator().manual_seed(
            seed * 1_000_003 + rnd * 7919 + zlib.crc32(site.encode())
        )
        noise = {k: torch.randn(deltas[k].shape, generator=gen, dtype=torch.float64) for k in keys}
        norm = torch.sqrt(sum(d.square().sum() for d in deltas.values()))  # type: ignore[arg-type]
        scale = norm / torch.sqrt(sum(n.square().sum() for n in noise.values()))  # type: ignore[arg-type]
        for k in keys:
            out[k] = (start[k] + scale * noise[k].to(start[k].device)).to(update.arrays[k].dtype)
    else:
        raise ValueError(f"unknown attack {kind!r}")
    return Update(out, update.num_examples, dict(update.metrics))


def invert_training_masks(data: ClientData) -> ClientData:
    """``data`` with its training masks inverted (``1 - y``); validation and test untouched."""
    train = Split(
        x=data.train.x, y=1.0 - data.train.y, case_ids=data.train.case_ids, names=data.train.names
    )
    return dataclasses.replace(data, train=train)
