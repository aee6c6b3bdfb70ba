"""The safeguard: a per-site final stage so that no site ends up with a model worse than the one
it could train alone (``safeguard.mode``).

Each site also trains a *local-only* model: the method's own network, from the run's initial
weights, on the site's data alone, with the protocol and budget of ``local``
(:mod:`fedoap.algorithms.local`): ``federation.rounds`` rounds of ``train.local_epochs`` epochs,
then ``finetune.epochs`` of fine-tuning, validated after each and selected on validation. For a
method whose network is ``local``'s (a plain U-Net: fedavg_ft, ditto, ...) that model is
``local``'s, bit for bit; for FedOAP it is FedOAP's network trained alone. It never leaves the
site: only the choice, and both validation scores, reach the server.

Before the test the site keeps, by its validation split (``train.select_metric``):

* ``choose``: the personalised federated model or the local one, whichever scores higher (a
  tie keeps the federated model);
* ``interpolate``: the best ``theta = alpha * theta_local + (1 - alpha) * theta_fed`` over the
  grid ``safeguard.alphas``, which holds 0 (the federated model) and 1 (the local one, exactly);
  ties go to the smaller alpha. Interpolating two models trained from the same initial weights
  is the weight-space ensembling of Wortsman et al. (WiSE-FT, CVPR 2022).

The stage costs what ``local`` costs, charged to the ``safeguard`` phase of ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from fedoap.algorithms import Algorithm
from fedoap.algorithms.local import Local
from fedoap.config import Config
from fedoap.models import StateDict

FEDERATED, LOCAL, INTERPOLATED = "federated", "local", "interpolated"
CHOICES = (FEDERATED, LOCAL, INTERPOLATED)


def enabled(cfg: Config) -> bool:
    return cfg.safeguard.mode != "none"


def steps(cfg: Config) -> int:
    """Steps of the safeguard stage: ``local``'s rounds, then its fine-tuning epochs."""
    return cfg.federation.rounds + cfg.finetune.epochs if enabled(cfg) else 0


def local_algorithm(cfg: Config) -> Algorithm:
    """``local``'s protocol, applied to whatever network it is given (every key is personal).
    The method's own options (``algorithm.*``) shape that network, not local's training."""
    return Local(dataclasses.replace(cfg, algorithm={}))


def blend(fed: StateDict, local: StateDict, alpha: float) -> StateDict:
    """``alpha * local + (1 - alpha) * fed`` of two state dicts of one network. At alpha 0 and 1
    the models themselves, bit for bit; integer buffers (step counters) are the federated
    model's below alpha 1."""
    if alpha == 0.0:
        return dict(fed)
    if alpha == 1.0:
        return dict(local)
    if set(fed) != set(local):
        raise ValueError("the federated and local models have different state keys")
    return {
        k: torch.lerp(v, local[k].to(v.dtype), alpha) if v.is_floating_point() else v
        for k, v in fed.items()
    }


@dataclass
class Decision:
    """What the site kept, and why (``summary.json``: ``clients.<name>.safeguard``)."""

    mode: str
    choice: str  # federated, local or interpolated
    alpha: float  # 0: the federated model, 1: the local one
    val_federated: float
    val_local: float
    val_chosen: float
    local_best_round: int
    scores: dict[str, float] | None = None  # interpolate: validation score per alpha

    def to_dict(self) -> dict[str, Any]:
        def num(x: float) -> float | None:  # -inf: a track validation never scored
            return x if math.isfinite(x) else None

        out: dict[str, Any] = {
            "mode": self.mode,
            "choice": self.choice,
            "alpha": self.alpha,
            "val": {
                FEDERATED: num(self.val_federated),
                LOCAL: num(self.val_local),
                "chosen": num(self.val_chosen),
            },
            "local_best_round": self.local_best_round,
        }
        if self.scores is not None:
            out["scores"] = {a: num(v) for a, v in self.scores.items()}
        return out


def choice_of(alpha: float) -> str:
    return FEDERATED if alpha == 0.0 else LOCAL if alpha == 1.0 else INTERPOLATED


def best_alpha(scores: dict[float, float]) -> float:
    """The alpha with the highest validation score; ties go to the smaller alpha (towards the
    federated model)."""
    top = max(scores.values())
    return min(a for a, s in scores.items() if s == top)
