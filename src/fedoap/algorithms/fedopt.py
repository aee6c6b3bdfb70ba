"""Server-side optimisers on the FedAvg pseudo-gradient (the FedOpt family).

Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2. With the round's
example-weighted mean ``w_avg`` of the client models and the current global ``w_t``, the
pseudo-gradient is ``Delta_t = w_avg - w_t`` and the server takes an optimiser step on it
instead of jumping to ``w_avg``. Clients run plain local epochs, as in FedAvg.

Each method is a subclass that defines :meth:`ServerOptimizer.step`. Server state (momentum and
second-moment buffers) lives in the runner's ``server`` dict and is checkpointed. The step is
computed in float64; integer buffers take the plain aggregate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedoap.aggregation import Aggregation
from fedoap.algorithms.base import Algorithm
from fedoap.basetypes import SHARED, StateDict, Update


class ServerOptimizer(Algorithm):
    """FedAvg clients, optimiser step on the server. Subclasses define ``step``."""

    def aggregate(
        self,
        global_arrays: StateDict,
        updates: Sequence[Update],
        server: StateDict,
        policy: Aggregation,
    ) -> StateDict:
        avg = super().aggregate(global_arrays, updates, server, policy)
        new = dict(avg)
        for k, w in global_arrays.items():
            if not (k.startswith(SHARED) and w.is_floating_point()):
                continue
            w64 = w.double()
            delta = avg[k].double() - w64
            new[k] = (w64 + self.step(k, delta, server)).to(w.dtype)
        return new

    def step(self, key: str, delta: torch.Tensor, server: StateDict) -> torch.Tensor:
        """The server update for one tensor given its pseudo-gradient ``delta`` (float64)."""
        raise NotImplementedError


def _buffer(server: StateDict, name: str, like: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """A float64 view of a server buffer, created on first use."""
    if name not in server:
        server[name] = torch.full_like(like, fill, dtype=torch.float64)
    return server[name]
