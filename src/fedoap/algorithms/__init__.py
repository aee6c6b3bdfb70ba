"""Federated methods, one file each, all on the same backbone. ``ALGORITHMS`` maps names to
classes; ``build_algorithm(cfg)`` instantiates the configured one."""

from fedoap.algorithms import (  # noqa: F401  (registration)
    apfl,
    centralized,
    ditto,
    fedadagrad,
    fedadam,
    fedala,
    fedavg,
    fedavg_ft,
    fedavgm,
    fedbabu,
    fedbn,
    feddp,
    fedoap,
    fedper,
    fedprox,
    fedrep,
    fedyogi,
    lg_fedavg,
    local,
)
from fedoap.algorithms.base import Algorithm, FitContext
from fedoap.algorithms.registry import ALGORITHMS
from fedoap.config import Config, ConfigError


def build_algorithm(cfg: Config) -> Algorithm:
    try:
        cls = ALGORITHMS.get(cfg.method)
    except KeyError as err:
        raise ConfigError(f"method: {err.args[0]}") from None
    return cls(cfg)


__all__ = ["ALGORITHMS", "Algorithm", "FitContext", "build_algorithm"]
