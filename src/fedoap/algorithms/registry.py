"""The registry of federated methods: ``method=<name>`` in a config selects one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedoap.config import Config, ConfigError
from fedoap.registry import Registry

if TYPE_CHECKING:
    from fedoap.algorithms.base import Algorithm

ALGORITHMS: Registry[type[Algorithm]] = Registry("method")


def check_privacy(cls: type[Algorithm], cfg: Config) -> None:
    """Refuse ``privacy.dp`` / ``privacy.client_dp`` for a method that does not declare
    ``supports_dp``, and client-level DP for one that shares no weights."""
    p = cfg.privacy
    for key, on in (("privacy.dp", p.dp.enabled), ("privacy.client_dp", p.client_dp.enabled)):
        if on and not cls.supports_dp:
            names = ALGORITHMS.names()
            supported = ", ".join(n for n in names if ALGORITHMS.get(n).supports_dp)
            raise ConfigError(
                f"{key}: method {cls.name} is not supported under DP yet (supported: {supported})"
            )
    if p.client_dp.enabled and not cls.shares_weights:
        raise ConfigError(f"privacy.client_dp: method {cls.name} shares nothing to noise")
