"""Per-image and per-case segmentation metrics (MONAI implementations, our empty-mask rule)."""

from fedoap.metrics.segmentation import (
    CASE_FIELDS,
    EMPTY_MASK_RULE,
    ImageMetrics,
    case_dice,
    case_scores,
    image_metrics,
    summarize,
)

__all__ = [
    "CASE_FIELDS",
    "EMPTY_MASK_RULE",
    "ImageMetrics",
    "case_dice",
    "case_scores",
    "image_metrics",
    "summarize",
]
