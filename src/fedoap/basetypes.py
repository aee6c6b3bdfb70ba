"""The types every layer shares: what crosses the network and what a site keeps.

Everything that crosses the network is a flat ``dict[str, Tensor]`` (a :data:`StateDict`) with
namespaced keys, ``shared.<state key>`` (:data:`SHARED`) and ``kv.<name>`` (:data:`KV`), exactly
what a Flower ``ArrayRecord`` holds. What a site sends after local training is an
:class:`Update`; what it keeps between rounds is a :class:`ClientState`, which never leaves it.
This module imports nothing of fedoap: methods, aggregation, the protocol and the transports all
build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

StateDict = dict[str, torch.Tensor]

#: Key prefix of the shared model weights in payloads.
SHARED = "shared."
#: Key prefix of the key/value summaries FedOAP's sites share.
KV = "kv."


@dataclass
class ClientState:
    """What a client keeps between rounds. Never sent."""

    personal: StateDict  # the client's personal parameters and buffers
    # Named torch optimiser state_dicts ("fit", "finetune", ...); they persist across rounds.
    optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: StateDict = field(default_factory=dict)  # method-specific tensors


@dataclass
class Update:
    """What a client sends after local training."""

    arrays: StateDict  # namespaced: shared.*, kv.*
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def nbytes(arrays: StateDict) -> int:
    """Bytes of a payload as it travels (raw tensor data)."""
    return sum(t.numel() * t.element_size() for t in arrays.values())


def clone(state: StateDict) -> StateDict:
    """Detached copies of every tensor."""
    return {k: v.detach().clone() for k, v in state.items()}
