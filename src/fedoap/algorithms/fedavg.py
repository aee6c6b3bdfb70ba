"""FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017.

Server: ``w_{t+1} = sum_k (n_k / n) w_k^{t+1}``. Client: E epochs of AdamW from ``w_t``. Every
parameter is shared; the backbone is the plain U-Net (no attention, no adapter) of the same width
as FedOAP's. No fine-tuning stage (see ``fedavg_ft``).
"""

from __future__ import annotations

from fedoap.algorithms.base import Algorithm
from fedoap.algorithms.registry import ALGORITHMS


@ALGORITHMS.register("fedavg")
class FedAvg(Algorithm):
    name = "fedavg"
    supports_dp = True
