"""The server's aggregation policy, built once from the config and applied by the server.

``federation.aggregator`` names the rule that combines the round's accepted uploads
(:mod:`fedoap.aggregation.rules`); ``privacy.client_dp`` replaces it by DP-FedAvg
(:mod:`fedoap.aggregation.dp`), which the robust rules do not compose with. A method receives
the policy in :meth:`fedoap.algorithms.Algorithm.aggregate` and decides what to do with its
result (a server optimiser's step, FedOAP's key/value bank). A new rule is a function registered
in :data:`fedoap.aggregation.rules.RULES`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedoap.aggregation.dp import dp_fedavg
from fedoap.aggregation.rules import RULES
from fedoap.basetypes import SHARED, StateDict, Update
from fedoap.config import Config, ConfigError
from fedoap.privacy import CLIENT_DP_ROUNDS
from fedoap.training import make_generator


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
        RULES.get(self.rule)  # an unknown name fails here, listing the known ones

    def combine(self, updates: Sequence[Update], keys: Sequence[str]) -> StateDict:
        """The rule's aggregate of ``keys`` over the uploads (no differential privacy)."""
        return RULES.get(self.rule)(updates, keys, self)

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
    try:
        return Aggregation(f.aggregator, f.trim_beta, f.num_byzantine, f.validate_updates, dp)
    except KeyError as err:  # the registry's message: the unknown name and the known ones
        raise ConfigError(f"federation.aggregator: {err.args[0]}") from None
