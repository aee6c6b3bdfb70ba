"""FedPer: Arivazhagan et al., "Federated Learning with Personalization Layers", 2019.

Base layers shared and averaged as in FedAvg; the personalisation layers stay local and train
jointly with the base every round. For a segmentation U-Net the personalisation layer is the
1x1 ``head`` (the analogue of the paper's classifier layers).

No options.
"""

from __future__ import annotations

from fedoap.algorithms.fedavg import FedAvg
from fedoap.algorithms.registry import ALGORITHMS


@ALGORITHMS.register("fedper")
class FedPer(FedAvg):
    name = "fedper"
    supports_dp = False  # not tested under DP
    personal_modules = ("head",)
