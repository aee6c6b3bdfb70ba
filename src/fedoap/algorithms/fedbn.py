"""FedBN: Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch
Normalization", ICLR 2021.

FedAvg, except that every normalisation layer (its affine parameters and any running
statistics) stays on the client. Norm layers are found by module type
(:data:`fedoap.models.blocks.NORM_TYPES`), never by parameter name. With the default
InstanceNorm there are no running statistics, so what stays local is each norm's affine scale
and shift; with ``model.norm=batch`` the running mean/variance stay local too, as in the paper.

No options.
"""

from __future__ import annotations

from torch import nn

from fedoap.algorithms.fedavg import FedAvg
from fedoap.algorithms.registry import ALGORITHMS
from fedoap.models.blocks import NORM_TYPES
from fedoap.models.partition import keys_of_type


@ALGORITHMS.register("fedbn")
class FedBN(FedAvg):
    name = "fedbn"
    supports_dp = False  # not tested under DP

    def personal_keys(self, model: nn.Module) -> set[str]:
        return keys_of_type(model, NORM_TYPES)
