"""What the server accepts from a site, whichever transport carried it.

A site's upload is refused, never aggregated, when its keys differ from the method's upload
template (:meth:`~fedoap.algorithms.Algorithm.upload_template`), a tensor has another shape or
dtype, a value is not finite, or its example count is not the training-set size the site
declared. In-process, uploads come from fedoap's own code, so a refusal there is a bug and stops
the run; on Flower a refused reply is logged, recorded in ``summary.json`` under ``refused``,
and the round goes on with the other sites (with none left, the global model stays as it was).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedoap.models import StateDict
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
