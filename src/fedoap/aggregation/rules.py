"""How the server combines the round's accepted uploads: the weighted mean, or a robust rule.

Every rule works per key over the uploads' tensors of that key (``shared.*``), in float64, and
returns tensors of the key's dtype. Integer tensors (batch norm's ``num_batches_tracked``) take
the maximum over the uploads the rule uses (all of them, except under Krum and multi-Krum).
``federation.aggregator`` picks the rule from :data:`RULES`; a new rule is one function
registered there, ``@RULES.register("name")`` taking the uploads, the keys and the server's
:class:`~fedoap.aggregation.policy.Aggregation` (its ``finite``, ``trim_beta``,
``num_byzantine``), in a module that ``fedoap.aggregation`` imports. The built-in rules:

- ``mean``: ``sum_k n_k w_k / sum_k n_k`` (FedAvg; McMahan et al. 2017). Breakdown point 0: one
  upload can move the result anywhere.
- ``median``: the coordinate-wise median, unweighted (Yin et al. 2018); with an even number of
  uploads, the mean of the two middle values. Breakdown point 1/2: fewer than half the uploads
  cannot move a coordinate beyond the honest values' range. With 4 sites, 1 attacker is
  tolerated, 2 are not.
- ``trimmed_mean``: per coordinate, drop the ``floor(beta * n)`` largest and smallest values and
  average the rest, unweighted (Yin et al. 2018). Breakdown point ``floor(beta * n) / n``: with 4
  sites and beta = 0.25, one upload is dropped at each end, so 1 attacker is tolerated.
- ``krum``: the upload whose summed squared distance to its ``n - f - 2`` nearest others is
  smallest (Blanchard et al. 2017). Needs ``n > 2 f + 2``; tolerates ``f`` attackers. With 4
  sites only f = 0 qualifies (n > 2 f + 2 fails for f = 1), so Krum then only picks the most
  central upload and guarantees nothing against an attacker.
- ``multi_krum``: the example-weighted mean of the ``n - f`` uploads with the best Krum scores
  (El Mhamdi et al. 2018); same condition on ``n`` and ``f``.

Every rule refuses, with :class:`ValueError`, input that would make its result meaningless: no
upload, an example count that is not a positive integer, a key missing from an upload, a shape
that differs between uploads, or a value that is not finite. The server refuses such uploads
before they get here (:mod:`fedoap.federation.protocol`); these checks hold when
``aggregate()`` is called directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fedoap.basetypes import StateDict, Update
from fedoap.registry import Registry

#: A rule: ``(uploads, keys, policy) -> the aggregate of keys``.
Rule = Callable[[Sequence[Update], Sequence[str], Any], StateDict]
#: The rules ``federation.aggregator`` names.
RULES: Registry[Rule] = Registry("aggregator")


def check_round(updates: Sequence[Update], keys: Sequence[str], finite: bool = True) -> None:
    """Refuse a round no rule can combine meaningfully (see the module docstring); with
    ``finite=False`` (``federation.validate_updates=false``: no defence, for measurement)
    non-finite values pass."""
    if not updates:
        raise ValueError("aggregation needs at least one upload")
    for i, u in enumerate(updates):
        n = u.num_examples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"upload {i}: num_examples must be a positive integer, got {n!r}")
    first = updates[0].arrays
    for k in keys:
        for i, u in enumerate(updates):
            if k not in u.arrays:
                raise ValueError(f"upload {i} lacks {k}")
            t = u.arrays[k]
            if t.shape != first[k].shape:
                raise ValueError(
                    f"upload {i}: {k} has shape {tuple(t.shape)}, upload 0 {tuple(first[k].shape)}"
                )
            if finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"upload {i}: {k} is not finite")


def _stack(updates: Sequence[Update], k: str) -> torch.Tensor:
    return torch.stack([u.arrays[k].double() for u in updates])  # (n, *shape)


def _per_key(
    updates: Sequence[Update], keys: Sequence[str], rule: Callable[[torch.Tensor], torch.Tensor]
) -> StateDict:
    """``rule`` over the stacked float64 values of each floating key; integers take the max."""
    out: StateDict = {}
    for k in keys:
        first = updates[0].arrays[k]
        if not first.is_floating_point():
            out[k] = torch.stack([u.arrays[k] for u in updates]).max(0).values
        else:
            out[k] = rule(_stack(updates, k)).to(first.dtype)
    return out


def weighted_mean(updates: Sequence[Update], keys: Sequence[str], finite: bool = True) -> StateDict:
    """``sum_k n_k a_k / sum_k n_k`` for each key (the ``mean`` rule)."""
    check_round(updates, keys, finite)
    w = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
    w = w / w.sum()
    return _per_key(updates, keys, lambda s: torch.tensordot(w, s, dims=1))


def coordinate_median(
    updates: Sequence[Update], keys: Sequence[str], finite: bool = True
) -> StateDict:
    """The coordinate-wise median (the mean of the two middle values for an even count)."""
    check_round(updates, keys, finite)
    n = len(updates)

    def median(s: torch.Tensor) -> torch.Tensor:
        v = torch.sort(s, dim=0).values
        return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2

    return _per_key(updates, keys, median)


def trimmed_mean(
    updates: Sequence[Update], keys: Sequence[str], beta: float, finite: bool = True
) -> StateDict:
    """Per coordinate, the mean after dropping the ``floor(beta * n)`` largest and smallest."""
    check_round(updates, keys, finite)
    n = len(updates)
    cut = math.floor(beta * n)
    if n - 2 * cut < 1:
        raise ValueError(f"trimmed_mean: beta={beta} drops all {n} uploads")
    return _per_key(updates, keys, lambda s: torch.sort(s, dim=0).values[cut : n - cut].mean(0))


def krum_scores(updates: Sequence[Update], keys: Sequence[str], f: int) -> torch.Tensor:
    """Each upload's Krum score: the sum of its squared distances to its ``n - f - 2`` nearest
    other uploads, over the floating tensors of ``keys`` flattened into one vector."""
    n = len(updates)
    if n <= 2 * f + 2:
        raise ValueError(f"krum needs more than 2 f + 2 = {2 * f + 2} uploads, got {n}")
    floating = [k for k in keys if updates[0].arrays[k].is_floating_point()]
    x = torch.stack(
        [torch.cat([u.arrays[k].double().flatten() for k in floating]) for u in updates]
    )  # (n, D)
    d2 = torch.cdist(x, x).square()  # (n, n)
    d2.fill_diagonal_(math.inf)
    nearest = torch.sort(d2, dim=1).values[:, : n - f - 2]
    return nearest.sum(1)


def krum(updates: Sequence[Update], keys: Sequence[str], f: int, finite: bool = True) -> StateDict:
    """The upload with the lowest Krum score (ties: the first)."""
    check_round(updates, keys, finite)
    best = int(torch.argmin(krum_scores(updates, keys, f)))
    return {k: updates[best].arrays[k].clone() for k in keys}


def multi_krum(
    updates: Sequence[Update], keys: Sequence[str], f: int, finite: bool = True
) -> StateDict:
    """The example-weighted mean of the ``n - f`` uploads with the lowest Krum scores."""
    check_round(updates, keys, finite)
    order = torch.argsort(krum_scores(updates, keys, f), stable=True)
    chosen = [updates[int(i)] for i in order[: len(updates) - f]]
    return weighted_mean(chosen, keys, finite)


# ---------------------------------------------------------------------- the registered rules


@RULES.register("mean")
def _mean(updates: Sequence[Update], keys: Sequence[str], p: Any) -> StateDict:
    return weighted_mean(updates, keys, p.finite)


@RULES.register("median")
def _median(updates: Sequence[Update], keys: Sequence[str], p: Any) -> StateDict:
    return coordinate_median(updates, keys, p.finite)


@RULES.register("trimmed_mean")
def _trimmed_mean(updates: Sequence[Update], keys: Sequence[str], p: Any) -> StateDict:
    return trimmed_mean(updates, keys, p.trim_beta, p.finite)


@RULES.register("krum")
def _krum(updates: Sequence[Update], keys: Sequence[str], p: Any) -> StateDict:
    return krum(updates, keys, p.num_byzantine, p.finite)


@RULES.register("multi_krum")
def _multi_krum(updates: Sequence[Update], keys: Sequence[str], p: Any) -> StateDict:
    return multi_krum(updates, keys, p.num_byzantine, p.finite)
