"""The server's aggregation policy, built once from the config and applied by the server.

``federation.aggregator`` names the rule that combines the round's accepted uploads
(:mod:`fedoap.aggregation.rules`); ``privacy.client_dp`` replaces it by DP-FedAvg
(:mod:`fedoap.aggregation.dp`), which the robust rules do not compose with. A method receives
the policy in :meth:`fedoap.algorithms.Algorithm.aggregate` and decides what to do with its
result (a server optimiser's step, FedOAP's key/value bank), so a new rule is one function in
``rules.py`` and one line in :data:`RULES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fedoap.aggregation.dp import dp_fedavg
from fedoap.aggregation.rules import (
    AGGREGATORS,
    coordinate_median,
    krum,
    multi_krum,
    trimmed_mean,
    weighted_mean,
)
from fedoap.basetypes import SHARED, StateDict, Update
from fedoap.config import Config
from fedoap.privacy import CLIENT_DP_ROUNDS
from fedoap.training import make_generator

Rule = Callable[[Sequence[Update], Sequence[str], "Aggregation"], StateDict]

#: ``federation.aggregator`` -> the rule, given the policy's parameters.
RULES: dict[str, Rule] = {
    "mean": lambda u, k, a: weighted_mean(u, k, a.finite),
    "median": lambda u, k, a: coordinate_median(u, k, a.finite),
    "trimmed_mean": lambda u, k, a: trimmed_mean(u, k, a.trim_beta, a.finite),
    "krum": lambda u, k, a: krum(u, k, a.num_byzantine, a.finite),
    "multi_krum": lambda u, k, a: multi_krum(u, k, a.num_byzantine, a.finite),
}
assert tuple(RULES) == AGGREGATORS


@dataclass(frozen=True)
class ClientDP:
    """DP-FedAvg's parameters (``privacy.client_dp``)."""

    clip_norm: float
    noise_multiplier: float
    seed: int


@dataclass(frozen=True)
class Aggregation:
    """How the server combines a round's uploads."""

    rule: str = "mean"  # federation.aggregator
    trim_beta: float = 0.25  # federation.trim_beta
    num_byzantine: int = 1  # federation.num_byzantine: the attackers Krum guards against
    finite: bool = True  # federation.validate_updates: refuse non-finite values
    client_dp: ClientDP | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown aggregator {self.rule!r}; known: {', '.join(RULES)}")

    def combine(self, updates: Sequence[Update], keys: Sequence[str]) -> StateDict:
        """The rule's aggregate of ``keys`` over the uploads (no differential privacy)."""
        return RULES[self.rule](updates, keys, self)

    def __call__(
        self, global_arrays: StateDict, updates: Sequence[Update], server: StateDict
    ) -> StateDict:
        """The new shared arrays (``shared.*`` keys) from the round's uploads: the rule's
        aggregate, or under DP-FedAvg the clipped, equally weighted and noised mean (its round
        count is kept in ``server``, the server's checkpointed state)."""
        keys = [k for k in updates[0].arrays if k.startswith(SHARED)]
        dp = self.client_dp
        if dp is None:
            return self.combine(updates, keys)
        done = int(server.get(CLIENT_DP_ROUNDS, torch.zeros((), dtype=torch.int64)))
        gen = make_generator(dp.seed, "client_dp", done + 1)
        out = dp_fedavg(global_arrays, updates, keys, dp.clip_norm, dp.noise_multiplier, gen)
        server[CLIENT_DP_ROUNDS] = torch.tensor(done + 1, dtype=torch.int64)
        return out


def build_aggregation(cfg: Config) -> Aggregation:
    """The policy a run's config asks for."""
    f, cdp = cfg.federation, cfg.privacy.client_dp
    dp = ClientDP(cdp.clip_norm, cdp.noise_multiplier, cfg.seed) if cdp.enabled else None
    return Aggregation(f.aggregator, f.trim_beta, f.num_byzantine, f.validate_updates, dp)
