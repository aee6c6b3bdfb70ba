"""What the server accepts from a site, whichever transport carried it.

A site's upload is refused, never aggregated, when its keys differ from the method's upload
template (:meth:`~fedoap.algorithms.Algorithm.upload_template`), a tensor has another shape or
dtype, a value is not finite, or its example count is not the training-set size the site
declared. In-process, uploads come from fedoap's own code, so a refusal there is a bug and stops
the run; on Flower a refused reply is logged, recorded in ``summary.json`` under ``refused``,
and the round goes on with the other sites (with none left, the global model stays as it was).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from fedoap.basetypes import KV, SHARED, StateDict, Update
from fedoap.training.engine import nonfinite_keys

Template = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def _few(keys: set[str]) -> str:
    shown = sorted(keys)[:3]
    return ", ".join(shown) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def check_upload(
    arrays: StateDict,
    num_examples: object,
    template: Template,
    declared: int | None = None,
    values: bool = True,
) -> str | None:
    """Why this upload must not be aggregated, or None when it may be. With ``values=False``
    (``federation.validate_updates=false``, no defence) only its form is checked: keys, shapes
    and dtypes, which aggregation needs to run at all."""
    missing, extra = set(template) - set(arrays), set(arrays) - set(template)
    if missing or extra:
        parts = [f"missing {_few(missing)}"] if missing else []
        parts += [f"unexpected {_few(extra)}"] if extra else []
        return "wrong keys: " + "; ".join(parts)
    for key, (shape, dtype) in template.items():
        value = arrays[key]
        if not isinstance(value, torch.Tensor):
            return f"{key} is not a tensor"
        if tuple(value.shape) != tuple(shape):
            return f"{key} has shape {tuple(value.shape)}, expected {tuple(shape)}"
        if value.dtype != dtype:
            return f"{key} has dtype {value.dtype}, expected {dtype}"
    if not values:
        return None
    bad = nonfinite_keys(arrays)
    if bad:
        return f"{len(bad)} tensor(s) not finite, e.g. {bad[0]}"
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        return f"num_examples must be a positive integer, got {num_examples!r}"
    if declared is not None and num_examples != declared:
        return (
            f"num_examples {num_examples} is not the {declared} training images the site "
            "declared (it would weigh the average)"
        )
    return None


def update_norm(arrays: StateDict, global_arrays: StateDict) -> float:
    """``||upload - global||_2`` over the shared floating tensors both hold (in float64)."""
    total = 0.0
    for k, v in arrays.items():
        if k.startswith(SHARED) and v.is_floating_point() and k in global_arrays:
            total += float((v.double() - global_arrays[k].double().to(v.device)).square().sum())
    return math.sqrt(total)


def summary_norm(arrays: StateDict) -> float:
    """``||summary||_2`` of an upload's floating ``kv.*`` tensors (0 without any)."""
    total = 0.0
    for k, v in arrays.items():
        if k.startswith(KV) and v.is_floating_point():
            total += float(v.double().square().sum())
    return math.sqrt(total)


def sample_clients(names: list[str], fraction: float, seed: int, rnd: int) -> list[str]:
    """The clients that train in round ``rnd`` (in their configured order)."""
    k = max(1, round(fraction * len(names)))
    if k >= len(names):
        return list(names)
    chosen = np.random.default_rng([seed, rnd]).choice(len(names), size=k, replace=False)
    return [names[i] for i in sorted(chosen)]


def norm_outliers(
    senders: list[str], updates: list[Update], global_arrays: StateDict, ratio: float | None
) -> dict[str, str]:
    """The senders whose update norm ``||upload - global||`` (over the shared floating
    tensors), or K/V summary norm, exceeds ``ratio`` (``federation.max_update_norm_ratio``)
    times the round's median, with why. None, or fewer than three uploads (with two, neither
    is an outlier of the other): nobody."""
    if ratio is None or len(updates) < 3:
        return {}
    norms = [update_norm(u.arrays, global_arrays) for u in updates]
    # K/V summaries (bank mode) have no global counterpart to subtract: their own norms.
    summaries = [summary_norm(u.arrays) for u in updates]
    median = float(np.median(norms))
    median_s = float(np.median(summaries))
    out: dict[str, str] = {}
    for name, norm, snorm in zip(senders, norms, summaries, strict=True):
        if norm > ratio * median:
            out[name] = (
                f"update norm {norm:.4g} is {norm / median:.3g} x the round's median "
                f"{median:.4g} (federation.max_update_norm_ratio={ratio:g})"
            )
        elif snorm > ratio * median_s:
            out[name] = (
                f"K/V summary norm {snorm:.4g} is {snorm / median_s:.3g} x the round's "
                f"median {median_s:.4g} (federation.max_update_norm_ratio={ratio:g})"
            )
    return out
