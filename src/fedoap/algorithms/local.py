"""Local training: each client trains alone, with the same budget as the federated methods.

Nothing travels. Each client trains ``federation.rounds * train.local_epochs`` epochs, then the
``finetune.epochs`` of the fine-tuning stage with the plain loss, so its number of gradient steps
matches FedOAP's. Model selection is per client on validation, as for every method. This is the
bar a federated method must clear on *every* client (no negative transfer).
"""

from __future__ import annotations

from torch import nn

from fedoap.algorithms.base import Algorithm
from fedoap.algorithms.registry import ALGORITHMS


@ALGORITHMS.register("local")
class Local(Algorithm):
    name = "local"
    has_finetune = True
    supports_dp = True
    shares_weights = False

    def personal_keys(self, model: nn.Module) -> set[str]:
        return set(model.state_dict())
