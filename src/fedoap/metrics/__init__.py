"""Per-image and per-case segmentation metrics (MONAI implementations, our empty-mask rule)."""

from fedoap.metrics.segmentation import (
    EMPTY_MASK_RULE,
    ImageMetrics,
    case_dice,
    image_metrics,
    summarize,
)

__all__ = ["EMPTY_MASK_RULE", "ImageMetrics", "case_dice", "image_metrics", "summarize"]
