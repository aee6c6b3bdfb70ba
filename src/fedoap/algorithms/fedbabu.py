"""FedBABU: Oh, Kim, Yun, "FedBABU: Toward Enhanced Representation for Federated Image
Classification", ICLR 2022.

During the federated stage only the body is trained and averaged; the ``head`` stays at its
random initialisation, identical on every client, and is never updated (so it is kept local:
sending it would carry no information). Then each client fine-tunes the whole model for
``finetune.epochs``.

No options (``finetune.*`` applies).
"""

from __future__ import annotations

from torch import nn

from fedoap.algorithms.base import Algorithm
from fedoap.algorithms.registry import ALGORITHMS


@ALGORITHMS.register("fedbabu")
class FedBABU(Algorithm):
    name = "fedbabu"
    personal_modules = ("head",)
    has_finetune = True

    def trainable(self, model: nn.Module, stage: str) -> list[nn.Parameter]:
        if stage == "fit":
            head = set(self.partition(model).personal)
            return [p for k, p in model.named_parameters() if k not in head]
        return super().trainable(model, stage)
