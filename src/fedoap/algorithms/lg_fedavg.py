"""LG-FedAvg: Liang et al., "Think Locally, Act Globally: Federated Learning with Local and
Global Representations", 2020.

The mirror image of FedPer: the representation (the lower layers) stays local and the upper
layers are shared. In the U-Net, the local representation is the ``encoder`` and the
``bottleneck``; the ``decoder`` and ``head`` are global. (The decoder still receives each
client's own skip features.)

No options.
"""

from __future__ import annotations

from fedoap.algorithms.fedavg import FedAvg
from fedoap.algorithms.registry import ALGORITHMS


@ALGORITHMS.register("lg_fedavg")
class LGFedAvg(FedAvg):
    name = "lg_fedavg"
    supports_dp = False  # not tested under DP
    personal_modules = ("encoder", "bottleneck")
