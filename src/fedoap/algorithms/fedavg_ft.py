"""FedAvg + fine-tuning: FedAvg (McMahan et al., AISTATS 2017) followed by local fine-tuning of
the whole model, the simplest personalisation baseline (e.g. Wang et al., "Federated Evaluation
of On-device Personalization", 2019).

Federated stage exactly as :mod:`fedoap.algorithms.fedavg`; then ``finetune.epochs`` epochs of
``L_seg`` on each client, starting from its best validated global model.

Config keys: ``finetune.epochs``, ``finetune.lr``, ``finetune.parts`` (``personal`` would
fine-tune nothing here: FedAvg has no personal parts, so use ``all``).
"""

from __future__ import annotations

from fedoap.algorithms.fedavg import FedAvg
from fedoap.algorithms.registry import ALGORITHMS


@ALGORITHMS.register("fedavg_ft")
class FedAvgFT(FedAvg):
    name = "fedavg_ft"
    supports_dp = False  # not tested under DP
    has_finetune = True
