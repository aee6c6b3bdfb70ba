"""FedAdagrad: Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2).

As :mod:`fedoap.algorithms.fedadam` with the Adagrad second moment ``v_t = v_{t-1} +
Delta_t^2``. The FedOAP paper compares against it.

Config keys: ``algorithm.server_lr`` (eta, 0.01), ``beta1`` (0.9), ``tau`` (1e-3); ``beta2`` is
unused.
"""

from __future__ import annotations

import torch

from fedoap.algorithms.fedadam import FedAdam
from fedoap.algorithms.registry import ALGORITHMS


@ALGORITHMS.register("fedadagrad")
class FedAdagrad(FedAdam):
    name = "fedadagrad"

    def second_moment(self, v: torch.Tensor, delta2: torch.Tensor) -> None:
        v.add_(delta2)
