"""Label volumes as tumour masks: which label values are tumour, and the {0, 1} mask they give."""

from __future__ import annotations

import numpy as np

from fedoap.config import VolumeSpec
from fedoap.data.errors import DataError
from fedoap.data.volumes.layouts import Layout


def tumour_values(layout: Layout, v: VolumeSpec, where: str) -> frozenset[int] | None:
    """The label values that are tumour; None: every non-zero value."""
    if not v.labels:
        return None
    out: set[int] = set()
    for label in v.labels:
        if isinstance(label, int):
            if layout.declared_labels is not None and label not in layout.declared_labels:
                raise DataError(
                    f"{where}: volume.labels value {label} is not declared in dataset.json "
                    f"(declared: {sorted(layout.declared_labels)})"
                )
            out.add(label)
            continue
        if label not in layout.label_names:
            known = ", ".join(layout.label_names) or "none (no dataset.json)"
            raise DataError(f"{where}: volume.labels name {label!r} is unknown; labels: {known}")
        out.update(layout.label_names[label])
    return frozenset(out)


def label_mask(
    label: np.ndarray, declared: frozenset[int] | None, tumour: frozenset[int] | None, where: str
) -> np.ndarray:
    """A label volume as a uint8 {0, 1} tumour mask; undeclared values are errors."""
    if label.dtype.kind == "f":
        rounded = np.rint(label)
        if not np.array_equal(rounded, label):
            raise DataError(f"{where}: label values must be integers, found fractions")
        label = rounded.astype(np.int64)
    values = np.unique(label)
    if declared is not None:
        odd = sorted(set(values.tolist()) - declared)
        if odd:
            raise DataError(
                f"{where}: label values {odd[:8]} are not declared in dataset.json "
                f"(declared: {sorted(declared)})"
            )
    if tumour is None:
        return (label != 0).astype(np.uint8)
    return np.isin(label, sorted(tumour)).astype(np.uint8)
