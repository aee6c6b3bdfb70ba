"""How the server combines the sites' uploads: the weighted mean, the robust rules, DP-FedAvg,
and the one policy a run's config builds from them (:func:`build_aggregation`)."""

from fedoap.aggregation.policy import RULES, Aggregation, build_aggregation
from fedoap.aggregation.rules import AGGREGATORS, weighted_mean

__all__ = ["AGGREGATORS", "RULES", "Aggregation", "build_aggregation", "weighted_mean"]
