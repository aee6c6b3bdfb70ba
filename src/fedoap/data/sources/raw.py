"""What every reader of client data returns, the size limits they all enforce, and the mask check
they share."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedoap.data.errors import DataError

#: Default largest height x width accepted (``DataConfig.max_image_pixels``), for callers that
#: have no config at hand.
MAX_IMAGE_PIXELS = 50_000_000
#: Largest volume, in voxels over every axis (data.max_volume_voxels): the largest public CT
#: volumes (LiTS, 512 x 512 x 987) fit, a 75-byte header declaring 2000 x 2000 x 150 does not.
MAX_VOLUME_VOXELS = 300_000_000


@dataclass
class RawClient:
    """One client's data as read, before it is split: 2D images and masks, one case id and name
    per image, and notes on what was converted."""

    images: np.ndarray  # (N, H, W) or (N, H, W, 3); uint8 or float
    masks: np.ndarray  # (N, H, W) uint8 in {0, 1}
    case_ids: np.ndarray  # (N,) str
    names: np.ndarray  # (N,) str, for reports and predictions
    notes: list[str] = field(default_factory=list)


def check_mask_values(
    mask: np.ndarray, where: str, lossy: bool = False
) -> tuple[np.ndarray, str | None]:
    """Return the mask as uint8 {0, 1} and a note if it had to be converted.

    {0, 1} passes; {0, 255} is divided by 255 with a note; a lossy (JPEG) mask is thresholded at
    half its range with a note; anything else is an error naming ``where`` and the values found.
    """
    values = np.unique(mask)
    if np.isin(values, (0, 1)).all():
        return mask.astype(np.uint8, copy=False), None
    if np.isin(values, (0, 255)).all():
        return (mask == 255).astype(np.uint8), f"{where}: 255-valued mask converted to {{0,1}}"
    if lossy and np.issubdtype(mask.dtype, np.integer):
        return (mask >= 128).astype(np.uint8), f"{where}: lossy mask thresholded at 128"
    shown = ", ".join(str(v) for v in values[:8]) + (" ..." if len(values) > 8 else "")
    raise DataError(
        f"{where}: mask values must be in {{0,1}} (or {{0,255}}), found {len(values)} distinct "
        f"values: {shown}"
    )


def too_large(what: str, w: int, h: int, max_pixels: int) -> str:
    """Why an image of ``w`` x ``h`` pixels is refused, for an error message."""
    return (
        f"{what} {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,} "
        "(data.max_image_pixels; raise it if the data is genuine)"
    )
