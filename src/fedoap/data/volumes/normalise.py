"""A volume's intensities normalised as a whole: CT clipped to a HU window and scaled to [0, 1],
MR clipped to per-volume percentiles and z-scored."""

from __future__ import annotations

import numpy as np

from fedoap.config import VolumeSpec
from fedoap.data.errors import DataError

#: Smallest per-volume standard deviation an MR z-score divides by.
MIN_STD = 1e-8


def intensity_kind(v: VolumeSpec, channel_name: str | None) -> str:
    """``ct`` or ``mr``: ``auto`` is ct for a channel named CT (nnU-Net's convention)."""
    if v.intensity != "auto":
        return v.intensity
    return "ct" if channel_name is not None and channel_name.strip().upper() == "CT" else "mr"


def normalise_volume(data: np.ndarray, kind: str, v: VolumeSpec, where: str) -> np.ndarray:
    """The volume's intensities as float32: CT windowed to [0, 1], MR clipped and z-scored.

    Works in float32 with float64 sums: a 512 x 512 x 600 CT is 0.6 GB as float32, twice that
    as float64.
    """
    with np.errstate(over="ignore"):  # values past float32 become inf: handled below
        x = data.astype(np.float32)
    if kind == "ct":
        if v.window is None:
            raise DataError(
                f"{where}: a CT channel needs volume.window (level, width in HU), e.g. [40, 400]"
            )
        level, width = v.window
        lo = level - width / 2
        np.clip(x, lo, lo + width, out=x)
        x -= np.float32(lo)
        x /= np.float32(width)
        return x
    # Beyond float32 (a header's scl_slope of 1e38): scale into range first; the z-score below
    # does not depend on the scale.
    if not np.isfinite(x).all():
        peak = float(np.abs(data).max())
        x = (np.asarray(data, dtype=np.float64) / peak).astype(np.float32)
    lo, hi = np.percentile(x, v.percentiles)
    np.clip(x, lo, hi, out=x)
    mean = float(x.mean(dtype=np.float64))
    x -= np.float32(mean)
    # Plane by plane: a float64 square of the whole volume is the copy this function avoids.
    std = float(np.sqrt(sum(float(np.square(p, dtype=np.float64).sum()) for p in x) / x.size))
    x /= np.float32(max(std, MIN_STD))
    if not np.isfinite(x).all():
        raise DataError(f"{where}: its intensities cannot be normalised in float32")
    return x
