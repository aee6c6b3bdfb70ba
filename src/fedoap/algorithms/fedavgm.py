"""FedAvgM: Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", 2019. Server momentum on the pseudo-gradient:

    v_t = beta v_{t-1} + Delta_t,      w_{t+1} = w_t + eta v_t

With ``momentum=0`` and ``server_lr=1`` it is FedAvg.

Config keys: ``algorithm.server_lr`` (eta, default 1.0), ``algorithm.momentum`` (beta, 0.9).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedoap.algorithms.fedopt import ServerOptimizer, _buffer
from fedoap.algorithms.registry import ALGORITHMS
from fedoap.config import ranged
from fedoap.models import StateDict


@dataclass(frozen=True)
class FedAvgMOptions:
    server_lr: float = ranged(1.0, gt=0)
    momentum: float = ranged(0.9, ge=0, lt=1)


@ALGORITHMS.register("fedavgm")
class FedAvgM(ServerOptimizer):
    name = "fedavgm"
    Options = FedAvgMOptions

    def step(self, key: str, delta: torch.Tensor, server: StateDict) -> torch.Tensor:
        o = self.options
        v = _buffer(server, f"momentum/{key}", delta)
        v.mul_(o.momentum).add_(delta)
        return o.server_lr * v
