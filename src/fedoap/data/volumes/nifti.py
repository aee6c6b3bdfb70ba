"""NIfTI files: a volume's voxels and geometry read (bounded before anything is decoded), a mask
written back with its source's affine and header."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedoap.data.errors import DataError
from fedoap.data.sources.raw import MAX_IMAGE_PIXELS, MAX_VOLUME_VOXELS

#: File endings read as NIfTI (through nibabel).
NIFTI_ENDINGS = (".nii.gz", ".nii")

#: Most channels a 4D volume's 4th axis may hold (modalities: the Decathlon's BraTS has 4).
MAX_CHANNELS = 16


@dataclass
class Volume:
    """One volume (a NIfTI file, or a DICOM series read by :mod:`fedoap.data.dicom`): its voxels
    (as stored: 3D, or 4D with channels last) and its geometry."""

    data: np.ndarray
    affine: np.ndarray  # (4, 4) voxel -> world (mm)
    zooms: tuple[float, ...]  # voxel spacing per axis, from the header
    header: Any  # nibabel.Nifti1Header, kept for writing a mask with the same header
    path: Path

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """The file's shape without its channel axis: what a mask of it has (a 2D file's
        data is read as one slice, (X, Y, 1), and its mask is written back as (X, Y))."""
        dims = int(self.header["dim"][0]) or self.data.ndim
        return tuple(int(n) for n in self.data.shape[: min(dims, 3)])


def nifti_stem(path: Path) -> str | None:
    """The name of a NIfTI file without its ending, or None if it is not NIfTI."""
    name = path.name
    for ending in NIFTI_ENDINGS:
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return None


def read_volume(
    path: Path, max_pixels: int = MAX_IMAGE_PIXELS, max_voxels: int = MAX_VOLUME_VOXELS
) -> Volume:
    """Read a NIfTI file; errors name the file.

    The header is read first: a volume whose largest plane has more than ``max_pixels`` voxels,
    or that has more than ``max_voxels`` in all, is refused before anything is allocated or
    decompressed. nibabel then reads exactly the bytes the header declares, so what a small
    gzip can expand to is bounded by the same limit. A truncated or corrupt file, and NaN or
    infinite voxels, are errors.
    """
    import nibabel as nib  # local: 0.3 s of import that only volume sources need
    from nibabel.spatialimages import HeaderDataError

    # What nibabel raises for a corrupt header or file: an unknown datatype, a vox_offset inside
    # the header or an infinite scl_inter (HeaderDataError), a vox_offset or size past a C long
    # (OverflowError), a short or damaged gzip stream (OSError, EOFError, zlib.error).
    corrupt = (
        nib.filebasedimages.ImageFileError,
        HeaderDataError,
        OSError,
        EOFError,
        ValueError,
        OverflowError,
        zlib.error,
    )
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img: Any = nib.load(str(path))
    except corrupt as err:
        raise DataError(f"{path}: cannot read as NIfTI (corrupt or truncated?): {err}") from err
    shape = tuple(int(n) for n in img.shape)
    if len(shape) < 2 or len(shape) > 4 or min(shape) < 1:
        raise DataError(
            f"{path}: a volume must have 2 to 4 non-empty dimensions, got shape {shape}"
        )
    plane = max(shape[i] * shape[j] for i in range(min(3, len(shape))) for j in range(i))
    if plane > max_pixels:
        raise DataError(
            f"{path}: a plane of shape {shape} has {plane:,} voxels, more than the limit of "
            f"{max_pixels:,} (data.max_image_pixels; raise it if the data is genuine); not read"
        )
    if len(shape) == 4 and shape[3] > MAX_CHANNELS:
        raise DataError(
            f"{path}: shape {shape}: a 4th axis of {shape[3]:,} is not a set of channels "
            f"(modalities; at most {MAX_CHANNELS}); a time series or diffusion volume cannot "
            "be segmented as one image; not read"
        )
    total = math.prod(shape)
    if total > max_voxels:
        raise DataError(
            f"{path}: shape {shape} has {total:,} voxels, more than the limit of {max_voxels:,} "
            "(data.max_volume_voxels; raise it if the data is genuine); not read"
        )
    if not np.isfinite(img.affine).all():  # a NaN in the sform or qform the header uses
        raise DataError(f"{path}: its affine (the header's sform or qform) is not finite numbers")
    try:
        data = np.asanyarray(img.dataobj)
    except corrupt as err:
        raise DataError(f"{path}: cannot read its voxels (corrupt or truncated?): {err}") from err
    if data.ndim == 2:
        data = data[..., None]
    if data.dtype.kind not in "buif":
        raise DataError(f"{path}: voxels of dtype {data.dtype} are not numbers")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise DataError(f"{path}: {bad:,} voxel(s) are NaN or infinite")
    zooms = tuple(float(z) for z in img.header.get_zooms())
    if not all(math.isfinite(z) for z in zooms[:3]):
        raise DataError(f"{path}: voxel spacing (pixdim) {zooms[:3]} is not finite numbers")
    return Volume(
        data=data, affine=np.asarray(img.affine), zooms=zooms, header=img.header, path=path
    )


def write_mask(path: Path, mask: np.ndarray, source: Volume) -> None:
    """Write a uint8 mask with the source volume's affine and header (atomically)."""
    import gzip

    import nibabel as nib

    from fedoap.fileio import atomic_write_bytes

    header = source.header.copy()
    header.set_data_dtype(np.uint8)
    img = nib.Nifti1Image(
        mask.reshape(source.spatial_shape).astype(np.uint8), source.affine, header
    )
    img.header.set_slope_inter(1.0, 0.0)  # a mask's values are labels: never scaled
    data = img.to_bytes()
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    atomic_write_bytes(path, data)
