"""FedProx: Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020.

The client minimises ``L_seg(w) + (mu / 2) ||w - w_t||^2`` over its shared parameters, ``w_t``
being the global model it received; the server is FedAvg's. With ``mu = 0`` it is FedAvg exactly.

Config keys: ``algorithm.mu`` (proximal weight, default 0.01).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedoap.algorithms.fedavg import FedAvg
from fedoap.algorithms.registry import ALGORITHMS
from fedoap.basetypes import SHARED, ClientState
from fedoap.config import ranged
from fedoap.models import StateDict


@dataclass(frozen=True)
class FedProxOptions:
    mu: float = ranged(0.01, ge=0)


@ALGORITHMS.register("fedprox")
class FedProx(FedAvg):
    name = "fedprox"
    supports_dp = False  # not tested under DP
    Options = FedProxOptions

    def penalty(
        self, model: nn.Module, global_arrays: StateDict, state: ClientState
    ) -> Callable[[], torch.Tensor] | None:
        mu = self.options.mu
        if mu == 0:
            return None
        params = dict(model.named_parameters())
        anchors = [
            (params[k], global_arrays[SHARED + k].detach().clone())
            for k in self.partition(model).shared
            if k in params
        ]
        return lambda: mu / 2 * sum(((p - g) ** 2).sum() for p, g in anchors)  # type: ignore[return-value]
