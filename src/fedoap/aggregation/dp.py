"""DP-FedAvg (``privacy.client_dp``; McMahan et al. 2018): the server clips each site's update of
the shared weights, averages them with equal weights and adds Gaussian noise to the mean. Its
accounting is in :mod:`fedoap.privacy`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedoap.basetypes import StateDict, Update


def dp_fedavg(
    global_arrays: StateDict,
    updates: Sequence[Update],
    keys: Sequence[str],
    clip: float,
    noise_multiplier: float,
    gen: torch.Generator,
) -> StateDict:
    """``g + mean_k clip(u_k - g) + N(0, (z C / K)^2)`` for the floating ``keys``; each site's
    update is clipped to L2 norm ``clip`` over all of them together (integer keys: the max)."""
    floats = [k for k in keys if updates[0].arrays[k].is_floating_point()]
    out: StateDict = {}
    for k in keys:
        if k not in floats:
            out[k] = torch.stack([u.arrays[k] for u in updates]).max(0).values
    deltas = [
        {k: u.arrays[k].double() - global_arrays[k].double() for k in floats} for u in updates
    ]
    total = {k: torch.zeros_like(global_arrays[k], dtype=torch.float64) for k in floats}
    for d in deltas:
        norm = math.sqrt(sum(float(v.square().sum()) for v in d.values()))
        factor = min(1.0, clip / norm) if norm > 0 else 1.0
        for k in floats:
            total[k] += factor * d[k]
    n = len(updates)
    std = noise_multiplier * clip / n
    for k in floats:
        noise = torch.randn(total[k].shape, generator=gen, dtype=torch.float64) * std
        out[k] = (global_arrays[k].double() + total[k] / n + noise).to(global_arrays[k].dtype)
    return out
