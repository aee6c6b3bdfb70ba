"""A DICOM series read into a volume: voxels, order and geometry by the standard's formula."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedoap.data.errors import DataError

pydicom = pytest.importorskip(
    "pydicom", reason='needs the [dicom] extra: pip install -e ".[dicom]"'
)

from fedoap.data.dicom import is_dicom_series, read_dicom_series  # noqa: E402

ROWS, COLS = 6, 5
PIXEL_SPACING = (0.7, 0.5)  # (between rows, between columns), as DICOM orders it
SLOPE, INTERCEPT = 2.0, -1024.0


def write_series(
    folder: Path,
    iop: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    origin: tuple[float, float, float] = (-100.0, -120.0, 30.0),
    dz: float = 2.5,
    n: int = 4,
    seed: int = 0,
) -> list[np.ndarray]:
    """``n`` slices of one series, written in shuffled file order; returns their stored pixels in
    slice order along the normal."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    row_dir, col_dir = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row_dir, col_dir)
    series = generate_uid()
    pixels = [rng.integers(0, 2000, (ROWS, COLS)).astype(np.int16) for _ in range(n)]
    for k in rng.permutation(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series
        ds.Modality = "CT"
        ds.Rows, ds.Columns = ROWS, COLS
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.ImageOrientationPatient = list(iop)
        ds.ImagePositionPatient = list(np.asarray(origin) + k * dz * normal)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope, ds.RescaleIntercept = SLOPE, INTERCEPT
        ds.PixelData = pixels[k].tobytes()
        ds.save_as(folder / f"IM{rng.integers(1 << 30):010d}.dcm", enforce_file_format=True)
    return pixels


@pytest.mark.parametrize(
    "iop",
    [(1, 0, 0, 0, 1, 0), (0, 1, 0, 0, 0, -1), (0.8, 0.6, 0, -0.6, 0.8, 0)],
    ids=["axial", "sagittal", "oblique"],
)
def test_series_voxels_and_affine_follow_the_dicom_formula(tmp_path, iop):
    pixels = write_series(tmp_path / "s", iop=iop)
    assert is_dicom_series(tmp_path / "s")
    vol = read_dicom_series(tmp_path / "s")
    assert vol.data.shape == (COLS, ROWS, 4)
    row_dir, col_dir = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row_dir, col_dir)
    for k in range(4):
        ipp = np.array([-100.0, -120.0, 30.0]) + k * 2.5 * normal
        for r, c in [(0, 0), (5, 4), (2, 3)]:
            # The value and the world position (LPS, negated x and y for RAS) of pixel (r, c).
            assert vol.data[c, r, k] == pixels[k][r, c] * SLOPE + INTERCEPT
            lps = ipp + c * PIXEL_SPACING[1] * row_dir + r * PIXEL_SPACING[0] * col_dir
            ras = vol.affine @ np.array([c, r, k, 1.0])
            assert np.allclose(ras[:3], lps * np.array([-1, -1, 1]), atol=1e-9)
    assert vol.zooms == pytest.approx((0.5, 0.7, 2.5))


def test_a_missing_slice_and_two_series_are_errors(tmp_path):
    write_series(tmp_path / "s")
    files = sorted((tmp_path / "s").iterdir())
    import pydicom as pd

    # Drop the second slice along the normal: the gaps are no longer even.
    by_z = sorted(files, key=lambda f: float(pd.dcmread(f).ImagePositionPatient[2]))
    by_z[1].unlink()
    with pytest.raises(DataError, match=r"slice gaps from 2.5 to 5 mm"):
        read_dicom_series(tmp_path / "s")
    write_series(tmp_path / "t", seed=1)
    other = next((tmp_path / "t").iterdir())
    other.rename(tmp_path / "s" / other.name)
    with pytest.raises(DataError, match=r"holds 2 series"):
        read_dicom_series(tmp_path / "s")


def test_a_file_that_is_not_dicom_is_named(tmp_path):
    write_series(tmp_path / "s")
    (tmp_path / "s" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes.txt: cannot read as DICOM"):
        read_dicom_series(tmp_path / "s")


def test_predict_on_a_series_folder_writes_a_nifti_mask_in_its_geometry(tmp_path):
    import nibabel as nib

    from fedoap.api import predict_images
    from tests.test_volumes import make_nnunet, one_round

    clients = [
        {"name": f"s{k}", "source": "nnunet", "path": str(make_nnunet(tmp_path / f"nn{k}", n=6))}
        for k in range(2)
    ]
    one_round(tmp_path / "run", clients)
    write_series(tmp_path / "in" / "CT.1.2", iop=(0, 1, 0, 0, 0, -1), n=7)
    (out,) = predict_images(tmp_path / "run", "s0", [tmp_path / "in" / "CT.1.2"], tmp_path / "o")
    assert out == (tmp_path / "o" / "CT.1.2_mask.nii.gz",)
    img = nib.load(out[0])
    vol = read_dicom_series(tmp_path / "in" / "CT.1.2")
    assert img.shape == (COLS, ROWS, 7) and np.allclose(img.affine, vol.affine)  # type: ignore[attr-defined]


@pytest.mark.parametrize("slope", ["NaN", "1e38"])
def test_a_rescale_that_is_not_finite_is_refused(tmp_path, slope):
    write_series(tmp_path / "s")
    f = sorted((tmp_path / "s").iterdir())[1]
    ds = pydicom.dcmread(f)
    ds.RescaleSlope = slope
    ds.save_as(f, enforce_file_format=True)
    with pytest.raises(DataError, match=rf"{f.name}: RescaleSlope .* not finite numbers"):
        read_dicom_series(tmp_path / "s")


def _corrupt(f: Path, key: str, value: object) -> None:
    """Set (or, with None, delete) one tag of ``f``. A string is written as raw bytes, as a
    malformed writer would have stored it: pydicom refuses to encode an invalid IS or DS."""
    import struct

    from pydicom.datadict import tag_for_keyword

    ds = pydicom.dcmread(f)
    if value is None:
        delattr(ds, key)
    elif isinstance(value, str):
        placeholder = "9" * len(value)  # a valid IS and DS of the same length
        setattr(ds, key, placeholder)
    else:
        setattr(ds, key, value)
    ds.save_as(f, enforce_file_format=True)
    if isinstance(value, str):
        tag = tag_for_keyword(key)
        assert tag is not None
        head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        raw = f.read_bytes()
        at = raw.index(head) + 8  # group, element, VR, 2-byte length (explicit VR little endian)
        padded = value.encode() + (b" " if len(value) % 2 else b"")
        assert raw[at : at + len(padded)].rstrip() == placeholder.encode()
        f.write_bytes(raw[:at] + padded + raw[at + len(padded) :])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("Rows", None, "has pixel data but no Rows"),
        ("Columns", None, "has pixel data but no Columns"),
        ("NumberOfFrames", "ab", "NumberOfFrames must be a positive integer, got 'ab'"),
        ("NumberOfFrames", "0", "NumberOfFrames must be a positive integer, got '0'"),
        ("PixelSpacing", [0, 0], r"PixelSpacing must be positive, got \[0.0, 0.0\]"),
        ("PixelSpacing", [0.5, -1], r"PixelSpacing must be positive, got \[0.5, -1.0\]"),
        ("RescaleSlope", "abc", "RescaleSlope must be a number, got 'abc'"),
        (
            "ImageOrientationPatient",
            [1, 0, 0, 1, 0, 0],
            r"ImageOrientationPatient \[1.0, 0.0, 0.0, 1.0, 0.0, 0.0\] is not two perpendicular",
        ),
    ],
)
def test_malformed_tags_are_named_errors(tmp_path, key, value, message):
    write_series(tmp_path / "s")
    f = sorted((tmp_path / "s").iterdir())[0]  # the slice whose geometry is read first
    _corrupt(f, key, value)
    with pytest.raises(DataError, match=rf"^{f}: {message}"):
        read_dicom_series(tmp_path / "s")
