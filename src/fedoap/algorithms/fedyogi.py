"""FedYogi: Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2).

As :mod:`fedoap.algorithms.fedadam` with Yogi's second moment
``v_t = v_{t-1} - (1 - b2) Delta_t^2 sign(v_{t-1} - Delta_t^2)``.

Config keys: as ``fedadam``.
"""

from __future__ import annotations

import torch

from fedoap.algorithms.fedadam import FedAdam
from fedoap.algorithms.registry import ALGORITHMS


@ALGORITHMS.register("fedyogi")
class FedYogi(FedAdam):
    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, delta2: torch.Tensor) -> None:
        v.sub_((1 - self.options.beta2) * delta2 * torch.sign(v - delta2))
