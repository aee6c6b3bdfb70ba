"""How the server combines the sites' uploads: the weighted mean, the robust rules, DP-FedAvg,
and the one policy a run's config builds from them (:func:`build_aggregation`)."""

from fedoap.aggregation.policy import Aggregation, build_aggregation
from fedoap.aggregation.rules import RULES, weighted_mean

__all__ = ["RULES", "Aggregation", "build_aggregation", "weighted_mean"]
