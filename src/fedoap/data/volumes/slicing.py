"""A 3D image as letterboxed 2D slices along one axis, and slice masks back into a volume."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedoap.config import VolumeSpec
from fedoap.data.errors import DataError
from fedoap.data.transforms import letterbox, unletterbox
from fedoap.data.volumes.nifti import Volume
from fedoap.data.volumes.normalise import normalise_volume


def slice_axis(v: VolumeSpec, zooms: Sequence[float]) -> int:
    """``volume.axis``, else the axis of coarsest spacing (the last of equals)."""
    if v.axis is not None:
        return v.axis
    spacing = np.asarray(zooms[:3], dtype=float)
    return int(np.flatnonzero(spacing == spacing.max())[-1])


def image_3d(vol: Volume, channel_index: int | None, where: str) -> np.ndarray:
    """The image's 3D array: the chosen channel of a 4D file, or the 3D file itself."""
    data = vol.data
    if data.ndim == 4:
        if channel_index is None:
            raise DataError(
                f"{where}: {vol.path} is 4D {data.shape} where a 3D volume is expected (one "
                "channel per file); pick a channel of a 4D image with the client's channel"
            )
        if channel_index >= data.shape[3]:
            raise DataError(
                f"{where}: {vol.path} has {data.shape[3]} channels on its 4th axis; channel "
                f"{channel_index} asked"
            )
        return np.asarray(data[..., channel_index])
    if channel_index not in (None, 0):
        raise DataError(f"{where}: {vol.path} is 3D; it has no channel {channel_index}")
    return np.asarray(data)


@dataclass
class PreparedVolume:
    """A volume ready for the 2D model: letterboxed slices along ``axis`` and how to undo it."""

    slices: np.ndarray  # (N, S, S) float32, normalised, letterboxed
    axis: int
    plane: tuple[int, int]  # (H, W) of a slice before letterboxing


def prepare_volume(
    image: np.ndarray,
    zooms: Sequence[float],
    kind: str,
    v: VolumeSpec,
    size: int,
    where: str,
    keep: np.ndarray | None = None,
) -> PreparedVolume:
    """Normalise a 3D image, cut it along its axis and letterbox each slice to ``size`` (only
    the slices ``keep`` indexes, when given: letterboxing is most of the cost)."""
    axis = slice_axis(v, zooms)
    x = np.moveaxis(normalise_volume(image, kind, v, where), axis, 0)  # (N, H, W)
    plane = (int(x.shape[1]), int(x.shape[2]))
    if keep is not None:
        x = x[keep]
    slices = np.stack([letterbox(s, size, is_mask=False) for s in x]) if len(x) else x
    return PreparedVolume(slices.astype(np.float32, copy=False), axis, plane)


def restore_slices(masks: np.ndarray, prepared: PreparedVolume) -> np.ndarray:
    """(N, S, S) {0, 1} slice masks back into a uint8 volume of the source's 3D shape."""
    h, w = prepared.plane
    planes = np.stack([unletterbox(m, h, w, is_mask=True) for m in masks])  # (N, H, W)
    return np.ascontiguousarray(np.moveaxis(planes, 0, prepared.axis)).astype(np.uint8)
