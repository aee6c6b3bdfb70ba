"""``.npz`` client files: each array's header checked before its data is read, then the arrays
validated as images, masks and case ids, optionally narrowed to the rows of one site."""

from __future__ import annotations

import math
import struct
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from fedoap.data.errors import DataError
from fedoap.data.sources.raw import MAX_IMAGE_PIXELS, RawClient, check_mask_values, too_large

#: What an ``.npz`` starts with: a zip archive, or an empty one (its end-of-directory record).
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")

#: Deflate cannot expand more than 1032:1 (a 258-byte match in two bits), so a deflated member
#: claiming more is corrupt or hostile, whatever its header says.
DEFLATE_MAX_RATIO = 1032

# Dtype kinds (numpy ``dtype.kind``) an array may have: unsigned/signed integers and floats for
# images; booleans too for masks, which are checked for {0, 1} values anyway.
IMAGE_KINDS = "uif"
MASK_KINDS = "buif"

# Everything reading a damaged zip can raise besides OSError/ValueError (UnicodeDecodeError is
# one): a flipped flag bit makes zipfile raise RuntimeError ("encrypted") or NotImplementedError
# (compression method), a torn record KeyError or struct.error, a torn stream EOFError or
# zlib.error.
_ZIP_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    KeyError,
    RuntimeError,
    NotImplementedError,
    zipfile.BadZipFile,
    struct.error,
    zlib.error,
)


def _check_images(images: np.ndarray, where: str) -> None:
    if np.issubdtype(images.dtype, np.floating):
        bad = ~np.isfinite(images)
        if bad.any():
            n_img = int(bad.reshape(len(images), -1).any(1).sum())
            first = int(np.argmax(bad.reshape(len(images), -1).any(1)))
            raise DataError(
                f"{where}: images contain NaN or infinite values in {n_img} image(s), "
                f"first at index {first}"
            )
    elif images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.integer):
        raise DataError(f"{where}: images must be uint8 or float, got dtype {images.dtype}")


def _read_npy_header(fp: IO[bytes]) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length in bytes) of the ``.npy`` stream ``fp``; reads no data."""
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    else:  # 3.0 only differs by utf-8 field names of structured dtypes, never valid here
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported")
    return tuple(shape), dtype, fp.tell()


def _read_member(
    zf: zipfile.ZipFile,
    member: str,
    key: str,
    path: Path,
    role: str | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """One array of an npz, read only after its ``.npy`` header passed every check.

    ``role`` (``"images"`` or ``"masks"``) adds the dtype check and the ``max_pixels`` bound on
    (N, H, W[, C]) arrays. The declared shape must account for exactly the bytes the zip entry
    holds, and the entry may not claim more bytes than its compressed data can expand to: a
    corrupt or hostile header is refused here, before numpy allocates what it declares.
    """
    where = f"{path}: '{key}'"
    info = zf.getinfo(member)
    with zf.open(info) as fp:
        shape, dtype, header_size = _read_npy_header(fp)
    if dtype.hasobject:
        raise DataError(
            f"{where} holds pickled (object) arrays, which fedoap never loads (unpickling a file "
            "can run arbitrary code); store it with a plain dtype (numbers or fixed-width strings)"
        )
    if role is not None:
        kinds = IMAGE_KINDS if role == "images" else MASK_KINDS
        # float128 would reach torch, which has no such dtype.
        if dtype.kind not in kinds or (dtype.kind == "f" and dtype.itemsize > 8):
            raise DataError(
                f"{where} has dtype {dtype}, which cannot hold {role}; use "
                + ("uint8 or float32" if role == "images" else "uint8 in {0, 1}")
            )
    declared = math.prod(shape) * dtype.itemsize
    held = info.file_size - header_size
    if declared != held:
        raise DataError(
            f"{where} declares shape {shape} of {dtype} ({declared:,} bytes) but its entry "
            f"holds {held:,} bytes (corrupt or truncated?)"
        )
    stored = info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size
    deflated = info.compress_type == zipfile.ZIP_DEFLATED and (
        info.file_size > DEFLATE_MAX_RATIO * info.compress_size + 1024
    )
    if stored or deflated:
        raise DataError(
            f"{where}: its zip entry claims {info.file_size:,} bytes from "
            f"{info.compress_size:,} bytes of data, more than they can hold (corrupt?)"
        )
    if role is not None and len(shape) >= 3 and shape[1] * shape[2] > max_pixels:
        what = f"holds {role} of"
        raise DataError(
            f"{where} " + too_large(what, shape[2], shape[1], max_pixels) + "; not loaded"
        )
    with zf.open(info) as fp:
        array: np.ndarray = np.lib.format.read_array(fp, allow_pickle=False)
    return array


def _read_error_detail(err: BaseException) -> str:
    """``err`` for a message. numpy's advice to pass ``allow_pickle=True`` is never passed on."""
    text = str(err) or type(err).__name__
    if "allow_pickle" in text:
        return "it holds pickled data, which fedoap never loads"
    return text


def load_npz(
    path: Path,
    use_rgb: bool = False,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    where: Mapping[str, Any] | None = None,
) -> RawClient:
    """Read an ``.npz`` in the format of ``../shared/data`` (see its README).

    Each array's header is checked before its data is read (see :func:`_read_member`): images
    larger than ``max_pixels`` (height x width), pickled arrays, dtypes that cannot hold images
    or masks, and sizes the file does not hold are refused without allocating them.

    ``where`` keeps the rows whose arrays hold the given values (``{"site": "DU"}``, or a list of
    values), compared as strings: one hospital of a multi-site file.
    """
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err}") from err
    if magic not in ZIP_MAGICS:
        # np.load would read it as a bare .npy (an array, not an archive) or try it as a pickle,
        # and advise allow_pickle=True: never, for a data file.
        raise DataError(f"{path}: not a valid .npz file (not a zip archive of .npy arrays)")
    img_key = "images_rgb" if use_rgb else "images"
    try:
        with zipfile.ZipFile(path) as zf:
            # Keys as np.load names them: the member name without ".npy".
            members = {n.removesuffix(".npy"): n for n in zf.namelist()}
            missing = {img_key, "masks"} - members.keys()
            if missing:
                raise DataError(
                    f"{path}: missing array(s) {sorted(missing)}; found {sorted(members)}"
                )
            images = _read_member(zf, members[img_key], img_key, path, "images", max_pixels)
            masks = _read_member(zf, members["masks"], "masks", path, "masks", max_pixels)
            case_ids = (
                _read_member(zf, members["case_ids"], "case_ids", path)
                if "case_ids" in members
                else None
            )
            names = (
                _read_member(zf, members["names"], "names", path) if "names" in members else None
            )
            selectors = {}
            for key in where or {}:
                if key not in members:
                    raise DataError(
                        f"{path}: where.{key}: the file has no array '{key}'; its arrays are "
                        f"{sorted(members)}"
                    )
                selectors[key] = _read_member(zf, members[key], key, path)
    except DataError:
        raise
    except MemoryError as err:
        raise DataError(f"{path}: not enough memory to load its arrays") from err
    except _ZIP_ERRORS as err:
        raise DataError(
            f"{path}: cannot read as .npz (corrupt or truncated?): {_read_error_detail(err)}"
        ) from err

    n = len(images)
    if n == 0:
        raise DataError(f"{path}: the client has no images (empty 'images' array)")
    want_ndim = 4 if use_rgb else 3
    if images.ndim != want_ndim or (use_rgb and images.shape[-1] != 3):
        raise DataError(
            f"{path}: '{img_key}' must have shape {'(N,H,W,3)' if use_rgb else '(N,H,W)'}, "
            f"got {images.shape}"
        )
    if masks.shape != images.shape[:3]:
        raise DataError(
            f"{path}: 'masks' shape {masks.shape} does not match '{img_key}' shape "
            f"{images.shape[:3]} (one (H, W) mask per image)"
        )
    notes: list[str] = []
    if where:
        keep = _select_rows(path, where, selectors, n)
        images, masks = images[keep], masks[keep]
        case_ids = None if case_ids is None or len(case_ids) != n else case_ids[keep]
        # Without names, rows are named by their index in the file (not in the selection).
        rows = np.flatnonzero(keep)
        names = (
            names[keep]
            if names is not None and len(names) == n
            else np.char.zfill(rows.astype(str), 6)
        )
        shown = ", ".join(f"{k}={v}" for k, v in where.items())
        notes.append(f"{path}: {int(keep.sum())} of {n} images where {shown}")
        n = int(keep.sum())
    _check_images(images, str(path))
    masks, note = check_mask_values(masks, str(path))
    if case_ids is None:
        case_ids = np.array([f"img{i:06d}" for i in range(n)])
    elif len(case_ids) != n:
        raise DataError(f"{path}: 'case_ids' has {len(case_ids)} entries for {n} images")
    if names is None or len(names) != n:
        names = np.array([f"{i:06d}" for i in range(n)])
    return RawClient(
        images=images,
        masks=masks,
        case_ids=np.asarray(case_ids).astype(str),
        names=np.asarray(names).astype(str),
        notes=notes + ([note] if note else []),
    )


def _select_rows(
    path: Path, where: Mapping[str, Any], selectors: dict[str, np.ndarray], n: int
) -> np.ndarray:
    """Boolean (n,) mask of the rows matching every ``where`` condition; errors name the file."""
    keep = np.ones(n, bool)
    for key, value in where.items():
        column = selectors[key]
        if column.ndim != 1 or len(column) != n:
            raise DataError(
                f"{path}: where.{key}: '{key}' has shape {column.shape}, not one value per image "
                f"({n})"
            )
        wanted = [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        keep &= np.isin(column.astype(str), wanted)
    if not keep.any():
        present = {k: sorted(set(selectors[k].astype(str).tolist()))[:20] for k in where}
        raise DataError(
            f"{path}: where {dict(where)} selects no image; the values present are {present}"
        )
    return keep
