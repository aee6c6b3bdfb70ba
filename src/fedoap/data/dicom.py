"""A DICOM series (one folder of single-frame slices) as a :class:`~fedoap.data.volumes.Volume`.

For ``fedoap predict`` on a scan exported straight from a PACS. Training data is read as NIfTI:
convert a series with ``dcm2niix -z y -o OUT SERIES_DIR`` first.

Geometry, from the DICOM standard (C.7.6.2.1.1): voxel (column c, row r) of a slice lies at
``ImagePositionPatient + c * PixelSpacing[1] * row_direction + r * PixelSpacing[0] *
column_direction`` in LPS millimetres, where ``ImageOrientationPatient`` holds the row and column
direction cosines. Slices are ordered along their normal (row x column), their spacing is read
from their positions and must be even. The volume is stored as NIfTI stores it: ``data[c, r, k]``
and an affine to RAS (x and y of LPS negated), as dcm2niix and nibabel do. Intensities are
``pixel * RescaleSlope + RescaleIntercept`` (Hounsfield units for CT).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fedoap.data.errors import DataError
from fedoap.data.sources import MAX_IMAGE_PIXELS, MAX_VOLUME_VOXELS
from fedoap.data.volumes import Volume

#: Largest spread (mm) of the gaps between neighbouring slices, or of their in-plane positions'
#: drift, accepted as one regular grid.
GEOMETRY_ATOL = 1e-2

#: Largest difference between two slices' direction cosines taken as one orientation.
ORIENTATION_ATOL = 1e-4

#: LPS (DICOM) to RAS (NIfTI) world coordinates.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_dicom_series(folder: Path) -> bool:
    """Whether ``folder`` holds DICOM files (the ``DICM`` marker at byte 128), and no NIfTI."""
    if not folder.is_dir():
        return False
    found = False
    for f in folder.iterdir():
        if not f.is_file() or f.name.startswith("."):
            continue
        if f.name.lower().endswith((".nii", ".nii.gz")):
            return False
        if not found:
            try:
                with open(f, "rb") as fh:
                    fh.seek(128)
                    found = fh.read(4) == b"DICM"
            except OSError:
                continue
    return found


def _floats(ds: Any, key: str, n: int, where: Path) -> np.ndarray:
    value: Any = getattr(ds, key, None)
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        out = np.empty(0)
    if out.shape != (n,) or not np.isfinite(out).all():
        raise DataError(f"{where}: {key} must hold {n} numbers, got {value!r}")
    return out


def read_dicom_series(
    folder: Path, max_pixels: int = MAX_IMAGE_PIXELS, max_voxels: int = MAX_VOLUME_VOXELS
) -> Volume:
    """Read the single-frame slices of one series in ``folder`` into a NIfTI-ordered Volume.
    Sizes are checked from the headers before any pixel data is decoded."""
    import nibabel as nib

    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:
        raise DataError(
            f"{folder}: reading DICOM needs pydicom (the [dicom] extra: "
            'pip install -e ".[dicom]"), or convert the series with dcm2niix first'
        ) from None

    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
        except (InvalidDicomError, OSError, ValueError, EOFError) as err:
            raise DataError(f"{f}: cannot read as DICOM (corrupt, or not DICOM?): {err}") from err
        if "PixelData" not in ds:
            continue  # a DICOMDIR, a report, a presentation state: no slice
        if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
            raise DataError(
                f"{f}: a multi-frame (enhanced) DICOM; convert it with dcm2niix and give the NIfTI"
            )
        slices.append((f, ds))
    if not slices:
        raise DataError(f"{folder}: no DICOM slice with pixel data")
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise DataError(
            f"{folder}: holds {len(series)} series ({', '.join(sorted(series)[:3])}...); give "
            "one series per folder"
        )

    first, ds0 = slices[0]
    iop = _floats(ds0, "ImageOrientationPatient", 6, first)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    spacing = _floats(ds0, "PixelSpacing", 2, first)  # (between rows, between columns)
    rows, cols = int(ds0.Rows), int(ds0.Columns)
    if rows * cols > max_pixels:
        raise DataError(
            f"{first}: {cols}x{rows} = {rows * cols:,} pixels, more than the limit of "
            f"{max_pixels:,} (data.max_image_pixels)"
        )
    if rows * cols * len(slices) > max_voxels:
        raise DataError(
            f"{folder}: {len(slices)} slices of {cols}x{rows} = {rows * cols * len(slices):,} "
            f"voxels, more than the limit of {max_voxels:,} (data.max_volume_voxels)"
        )
    positions = []
    for f, ds in slices:
        if not np.allclose(
            _floats(ds, "ImageOrientationPatient", 6, f), iop, atol=ORIENTATION_ATOL
        ):
            raise DataError(f"{f}: its orientation differs from {first.name}'s: not one volume")
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise DataError(f"{f}: {ds.Columns}x{ds.Rows} pixels, {first.name} {cols}x{rows}")
        positions.append(_floats(ds, "ImagePositionPatient", 3, f))
    pos = np.stack(positions)
    order = np.argsort(pos @ normal, kind="stable")
    pos = pos[order]
    slices = [slices[i] for i in order]
    if len(slices) > 1:
        gaps = np.diff(pos @ normal)
        if gaps.min() <= 0 or gaps.max() - gaps.min() > GEOMETRY_ATOL:
            raise DataError(
                f"{folder}: slice gaps from {gaps.min():.4g} to {gaps.max():.4g} mm along the "
                "normal: not one evenly spaced volume (a repeated or missing slice?)"
            )
        # Every slice must sit on the first one's normal line: no in-plane drift (gantry tilt).
        drift = pos - pos[0] - np.outer((pos - pos[0]) @ normal, normal)
        if np.abs(drift).max() > GEOMETRY_ATOL:
            raise DataError(
                f"{folder}: slices shift in-plane by up to {np.abs(drift).max():.3g} mm (a tilted "
                "gantry?); resample it with dcm2niix first"
            )
        dz = float(gaps.mean())
    else:
        dz = float(getattr(ds0, "SliceThickness", 1.0) or 1.0)

    planes = []
    for f, ds in slices:
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as err:  # pydicom raises many kinds for a missing codec or bad data
            raise DataError(f"{f}: cannot decode its pixels: {err}") from err
        if pixels.ndim != 2:
            raise DataError(f"{f}: pixel data of shape {pixels.shape}; one grayscale plane needed")
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        plane = pixels * slope + intercept
        if not (math.isfinite(slope) and math.isfinite(intercept)) or not np.isfinite(plane).all():
            raise DataError(
                f"{f}: RescaleSlope {slope:g} and RescaleIntercept {intercept:g} give values "
                "that are not finite numbers"
            )
        planes.append(plane.T)  # (columns, rows): NIfTI's i, j
    data = np.stack(planes, axis=-1)  # (columns, rows, slices)

    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]  # i: along a row, one column at a time
    lps[:3, 1] = col_dir * spacing[0]  # j: down a column, one row at a time
    lps[:3, 2] = normal * dz
    lps[:3, 3] = pos[0]
    affine = LPS_TO_RAS @ lps
    header = nib.Nifti1Image(data, affine).header
    return Volume(
        data=data,
        affine=affine,
        zooms=(float(spacing[1]), float(spacing[0]), dz),
        header=header,
        path=folder,
    )
