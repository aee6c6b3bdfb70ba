"""Centralized training: every client's training set pooled into one model.

**A privacy-breaking reference point, not a federated method**: it needs the hospitals' raw
images in one place. It shows what one shared model can reach with all the data. One epoch is a
pass over the union of the training sets (each image once); ``federation.rounds *
train.local_epochs`` epochs in all, the same per-image budget as FedAvg. The model is still
selected per client on that client's validation split, and scored on its test split.
Reports mark it with ``breaks_privacy: true``; its ``comm`` bytes are 0 (it moves data, not
models).
"""

from __future__ import annotations

from fedoap.algorithms.base import Algorithm
from fedoap.algorithms.registry import ALGORITHMS


@ALGORITHMS.register("centralized")
class Centralized(Algorithm):
    name = "centralized"
    pooled = True
    breaks_privacy = True
