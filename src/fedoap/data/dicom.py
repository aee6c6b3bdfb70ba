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
from fedoap.data.sources.raw import MAX_IMAGE_PIXELS, MAX_VOLUME_VOXELS
from fedoap.data.volumes.nifti import Volume

#: Largest spread (mm) of the gaps between neighbouring slices, or of their in-plane positions'
#: drift, accepted as one regular grid.
GEOMETRY_ATOL = 1e-2

#: Largest difference between two slices' direction cosines taken as one orientation.
ORIENTATION_ATOL = 1e-4

#: Largest relative difference between two slices' PixelSpacing taken as one grid.
SPACING_RTOL = 1e-4

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
    value: Any = _tag(ds, key, where)
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        out = np.empty(0)
    if out.shape != (n,) or not np.isfinite(out).all():
        raise DataError(f"{where}: {key} must hold {n} numbers, got {value!r}")
    return out


def _tag(ds: Any, key: str, where: Path, default: Any = None) -> Any:
    """A tag's value; pydicom decodes lazily, so a malformed value fails here, not later."""
    try:
        return getattr(ds, key, default)
    except Exception as err:  # pydicom raises several kinds for a value it cannot convert
        raise DataError(f"{where}: cannot read its {key}: {err}") from None


def _int(ds: Any, key: str, where: Path, default: int | None = None) -> int:
    """An integer tag (Rows, NumberOfFrames: US or IS), required unless it has a default."""
    value = _tag(ds, key, where)
    if value is None or value == "":
        if default is None:
            raise DataError(f"{where}: has pixel data but no {key}")
        return default
    try:
        out = int(str(value).strip())
    except ValueError:
        out = -1
    if not 1 <= out < 2**31:
        raise DataError(f"{where}: {key} must be a positive integer, got {str(value)[:40]!r}")
    return out


def _float(ds: Any, key: str, where: Path, default: float) -> float:
    """A number tag (RescaleSlope: DS); absent or empty gives ``default``."""
    value = _tag(ds, key, where)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {key} must be a number, got {str(value)[:40]!r}") from None


def _is_image(ds: Any, where: Path) -> bool:
    """Whether ``ds`` says it is an image: its SOP class is one of the "... Image Storage"."""
    meta = getattr(ds, "file_meta", None)
    uid = _tag(meta, "MediaStorageSOPClassUID", where) if meta is not None else None
    uid = uid or _tag(ds, "SOPClassUID", where)
    return "Image Storage" in str(getattr(uid, "name", ""))


def _check_pixel_bytes(ds: Any, where: Path, rows: int, cols: int) -> None:
    """Refuse uncompressed pixel data a whole row or more longer than Rows x Columns says: the
    header does not describe the pixels. pydicom would drop the excess as padding and decode a
    shifted or cropped image."""
    data = _tag(ds, "PixelData", where)
    if not data:  # an empty element reads as None
        raise DataError(f"{where}: its PixelData is empty")
    meta = getattr(ds, "file_meta", None)
    syntax: Any = _tag(meta, "TransferSyntaxUID", where) if meta is not None else None
    bits = _tag(ds, "BitsAllocated", where)
    samples = _tag(ds, "SamplesPerPixel", where) or 1
    native = getattr(syntax, "is_transfer_syntax", False) and not syntax.is_compressed
    if not (native and isinstance(bits, int) and isinstance(samples, int)) or bits % 8:
        return  # compressed, unknown, or not whole bytes: pydicom's decoder checks these
    row = cols * samples * bits // 8
    extra = len(data) - rows * row
    if row > 0 and extra >= row:
        raise DataError(
            f"{where}: PixelData holds {extra:,} bytes more than {rows}x{cols} (Rows x Columns) "
            f"pixels of {bits} bits: those tags do not describe its pixels"
        )


def read_dicom_series(
    folder: Path, max_pixels: int = MAX_IMAGE_PIXELS, max_voxels: int = MAX_VOLUME_VOXELS
) -> Volume:
    """Read the single-frame slices of one series in ``folder`` into a NIfTI-ordered Volume.
    Sizes are checked from the headers before any pixel data is decoded."""
    import nibabel as nib

    try:
        import pydicom
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
        except Exception as err:  # pydicom raises many kinds for a damaged file
            raise DataError(f"{f}: cannot read as DICOM (corrupt, or not DICOM?): {err}") from err
        if "PixelData" not in ds:
            if _is_image(ds, f):  # pydicom stops quietly where a truncated file ends
                raise DataError(f"{f}: an image without pixel data (a truncated file?)")
            continue  # a DICOMDIR, a report, a presentation state: no slice
        if _int(ds, "NumberOfFrames", f, default=1) != 1:
            raise DataError(
                f"{f}: a multi-frame (enhanced) DICOM; convert it with dcm2niix and give the NIfTI"
            )
        slices.append((f, ds))
    if not slices:
        raise DataError(f"{folder}: no DICOM slice with pixel data")
    series = {str(_tag(ds, "SeriesInstanceUID", f, "")) for f, ds in slices}
    if len(series) > 1:
        raise DataError(
            f"{folder}: holds {len(series)} series ({', '.join(sorted(series)[:3])}...); give "
            "one series per folder"
        )

    first, ds0 = slices[0]
    iop = _floats(ds0, "ImageOrientationPatient", 6, first)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-2:
        raise DataError(
            f"{first}: ImageOrientationPatient {iop.tolist()} is not two perpendicular unit vectors"
        )
    spacing = _floats(ds0, "PixelSpacing", 2, first)  # (between rows, between columns)
    if not (spacing > 0).all():
        raise DataError(f"{first}: PixelSpacing must be positive, got {spacing.tolist()}")
    rows, cols = _int(ds0, "Rows", first), _int(ds0, "Columns", first)
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
        if (_int(ds, "Rows", f), _int(ds, "Columns", f)) != (rows, cols):
            raise DataError(f"{f}: {ds.Columns}x{ds.Rows} pixels, {first.name} {cols}x{rows}")
        other = _floats(ds, "PixelSpacing", 2, f)
        if not np.allclose(other, spacing, rtol=SPACING_RTOL, atol=0):
            raise DataError(
                f"{f}: PixelSpacing {other.tolist()} differs from {first.name}'s "
                f"{spacing.tolist()}: not one volume"
            )
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
        dz = _float(ds0, "SliceThickness", first, 1.0) or 1.0
        if not (math.isfinite(dz) and dz > 0):
            raise DataError(f"{first}: SliceThickness must be a positive number, got {dz:g}")

    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]  # i: along a row, one column at a time
    lps[:3, 1] = col_dir * spacing[0]  # j: down a column, one row at a time
    lps[:3, 2] = normal * dz
    lps[:3, 3] = pos[0]
    affine = LPS_TO_RAS @ lps
    if not np.abs(affine).max() < np.finfo(np.float32).max:
        raise DataError(
            f"{folder}: ImagePositionPatient, PixelSpacing and the slice spacing give an affine "
            f"entry of {np.abs(affine).max():.3g} mm, past what a NIfTI header holds (float32)"
        )

    planes = []
    for f, ds in slices:
        _check_pixel_bytes(ds, f, rows, cols)
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as err:  # pydicom raises many kinds for a missing codec or bad data
            raise DataError(f"{f}: cannot decode its pixels: {err}") from err
        if pixels.shape != (rows, cols):
            raise DataError(
                f"{f}: pixel data of shape {pixels.shape}; one grayscale plane of {rows}x{cols} "
                "(Rows x Columns) needed"
            )
        slope = _float(ds, "RescaleSlope", f, 1.0) or 1.0
        intercept = _float(ds, "RescaleIntercept", f, 0.0)
        with np.errstate(over="ignore", invalid="ignore"):  # checked, and named, below
            plane = pixels * slope + intercept
        if not (math.isfinite(slope) and math.isfinite(intercept)) or not np.isfinite(plane).all():
            raise DataError(
                f"{f}: RescaleSlope {slope:g} and RescaleIntercept {intercept:g} give values "
                "that are not finite numbers"
            )
        planes.append(plane.T)  # (columns, rows): NIfTI's i, j
    data = np.stack(planes, axis=-1)  # (columns, rows, slices)

    header = nib.Nifti1Image(data, affine).header
    return Volume(
        data=data,
        affine=affine,
        zooms=(float(spacing[1]), float(spacing[0]), dz),
        header=header,
        path=folder,
    )
