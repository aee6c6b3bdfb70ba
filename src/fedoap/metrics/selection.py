"""Model selection on the validation split, one rule for every place that selects: a site's
federated rounds and fine-tuning epochs, the safeguard's choice and blend, and ``fedoap adapt``'s
epochs. The score is the validation result's ``train.select_metric``; a score that could not be
computed (None: no image of the split has the quantity) never wins, and a later candidate
replaces the best only when it is strictly better, so ties keep the earliest."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def selection_score(val: Mapping[str, Any], metric: str) -> float:
    """``val[metric]`` as a float; minus infinity where it is None."""
    score = val[metric]
    return -math.inf if score is None else float(score)


def improves(val: Mapping[str, Any], metric: str, best: float) -> bool:
    """Whether ``val`` replaces a best candidate that scored ``best``."""
    return selection_score(val, metric) > best
