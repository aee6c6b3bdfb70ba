"""FedAdam: Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2).

    m_t = b1 m_{t-1} + (1 - b1) Delta_t
    v_t = b2 v_{t-1} + (1 - b2) Delta_t^2
    w_{t+1} = w_t + eta m_t / (sqrt(v_t) + tau)

with ``v_{-1} = tau^2``, as in the paper.

Config keys: ``algorithm.server_lr`` (eta, 0.01), ``beta1`` (0.9), ``beta2`` (0.99), ``tau``
(1e-3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedoap.algorithms.fedopt import ServerOptimizer, _buffer
from fedoap.algorithms.registry import ALGORITHMS
from fedoap.config import ranged
from fedoap.models import StateDict


@dataclass(frozen=True)
class AdaptiveOptions:
    server_lr: float = ranged(0.01, gt=0)
    beta1: float = ranged(0.9, ge=0, lt=1)
    beta2: float = ranged(0.99, ge=0, lt=1)
    tau: float = ranged(1e-3, gt=0)


@ALGORITHMS.register("fedadam")
class FedAdam(ServerOptimizer):
    name = "fedadam"
    Options = AdaptiveOptions

    def second_moment(self, v: torch.Tensor, delta2: torch.Tensor) -> None:
        v.mul_(self.options.beta2).add_((1 - self.options.beta2) * delta2)

    def step(self, key: str, delta: torch.Tensor, server: StateDict) -> torch.Tensor:
        o = self.options
        m = _buffer(server, f"m/{key}", delta)
        v = _buffer(server, f"v/{key}", delta, fill=o.tau**2)
        m.mul_(o.beta1).add_((1 - o.beta1) * delta)
        self.second_moment(v, delta * delta)
        return o.server_lr * m / (v.sqrt() + o.tau)
