"""Readers for client data: ``.npz`` arrays and folders of image/mask pairs.

Both return a :class:`RawClient`: images (N, H, W) or (N, H, W, 3), masks (N, H, W) in {0, 1},
case ids, and notes about conversions that were made (255-valued masks, thresholded JPEG masks,
merged extra masks). Every check runs here, before any training, and every error names the file.
"""

from __future__ import annotations

import math
import re
import struct
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedoap.data.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LOSSY_EXTENSIONS = (".jpg", ".jpeg")

#: Default largest height x width accepted (``DataConfig.max_image_pixels``), for callers that
#: have no config at hand.
MAX_IMAGE_PIXELS = 50_000_000
#: Largest volume, in voxels over every axis (data.max_volume_voxels): the largest public CT
#: volumes (LiTS, 512 x 512 x 987) fit, a 75-byte header declaring 2000 x 2000 x 150 does not.
MAX_VOLUME_VOXELS = 300_000_000

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


@dataclass
class RawClient:
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


def _too_large(what: str, w: int, h: int, max_pixels: int) -> str:
    return (
        f"{what} {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,} "
        "(data.max_image_pixels; raise it if the data is genuine)"
    )


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
            f"{where} " + _too_large(what, shape[2], shape[1], max_pixels) + "; not loaded"
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


def _bomb_error(path: Path, err: Exception, max_pixels: int) -> DataError:
    """PIL's own refusal of a huge image (raised inside ``Image.open``, before our bound can be
    checked) as a :class:`DataError` naming the file and the bound."""
    hit = re.search(r"\((\d+) pixels\)", str(err))
    pixels = int(hit.group(1)) if hit else None
    if pixels is not None and pixels <= max_pixels:
        # Only for a bound raised past PIL's hard limit (2 x Image.MAX_IMAGE_PIXELS, 179 MP).
        return DataError(f"{path}: PIL refuses to decode it: {err}")
    size = f"{pixels:,}" if pixels is not None else "too many"
    return DataError(
        f"{path}: image is {size} pixels, more than the limit of {max_pixels:,} "
        "(data.max_image_pixels; raise it if the data is genuine); not decoded"
    )


def read_image(
    path: Path, channels: int, channel: int | None = None, *, max_pixels: int = MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Read one image file as (H, W) (channels=1) or (H, W, 3); errors name the file.

    Its size is read from the header and checked against ``max_pixels`` (height x width) before
    any pixel is decoded: a 164 KB PNG can declare 13000 x 13000 pixels and cost 2 GB to decode.
    """
    pil_limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # PIL warns in Image.open above Image.MAX_IMAGE_PIXELS (89 MP): our own check of the
            # same size follows at once, with a message that names the file and the bound.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size  # from the header: Image.open decodes no pixel
                if w * h > max_pixels:
                    raise DataError(
                        f"{path}: " + _too_large("image is", w, h, max_pixels) + "; not decoded"
                    )
                # A warning while decoding concerns a size not checked above (a plugin's other
                # frame or resolution): an error, unless the bound was raised past PIL's limit.
                if pil_limit is None or max_pixels <= pil_limit:
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()  # forces decoding: a truncated file fails here, not later
                arr = np.asarray(im)
    except DataError:
        raise
    except FileNotFoundError as err:
        raise DataError(f"image file not found: {path}") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _bomb_error(path, err, max_pixels) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot decode image (corrupt or truncated?): {err}") from err
    if arr.ndim == 3 and arr.shape[-1] == 4:  # drop alpha
        arr = arr[..., :3]
    if channels == 1:
        if arr.ndim == 3:
            if channel is not None:
                if channel >= arr.shape[-1]:
                    raise DataError(
                        f"{path}: has {arr.shape[-1]} channels, channel={channel} asked"
                    )
                arr = arr[..., channel]
            else:  # ITU-R 601 luma, as PIL's "L" conversion
                arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    else:
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: image contains NaN or infinite values")
    return arr


def read_mask(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[np.ndarray, str | None]:
    arr = read_image(path, channels=1, max_pixels=max_pixels)
    if arr.dtype != np.uint8:
        arr = np.rint(arr).astype(np.int64)
    return check_mask_values(arr, str(path), lossy=path.suffix.lower() in LOSSY_EXTENSIONS)


def _list_images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def load_folder(
    path: Path,
    channels: int = 1,
    image_dir: str = "images",
    mask_dir: str = "masks",
    mask_suffix: str = "",
    case_regex: str | None = None,
    channel: int | None = None,
    resize_to: int | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> RawClient:
    """Read image/mask pairs from a folder, matching each image to its mask **by name**.

    The mask of ``<image_dir>/<rel>/<stem>.<ext>`` is ``<mask_dir>/<rel>/<stem><mask_suffix>.<any
    ext>``. Extra masks ``<stem><mask_suffix>_<k>`` (BUSI stores a second lesion that way) are
    merged into the first by union. Images are letterboxed to ``resize_to`` as they are read.
    A file of more than ``max_pixels`` (height x width) is refused before it is decoded.
    """
    from fedoap.data.transforms import letterbox  # local: avoids a cycle at import time

    if not path.is_dir():
        raise DataError(f"data folder not found: {path}")
    img_root, mask_root = path / image_dir, path / mask_dir
    for folder in (img_root, mask_root):
        if not folder.is_dir():
            raise DataError(f"{path}: expected sub-folder '{folder.relative_to(path)}' not found")
    same_dir = img_root.resolve() == mask_root.resolve()
    mask_re = re.compile(re.escape(mask_suffix) + r"(?:_(\d+))?$") if mask_suffix else None

    # Index masks by (relative parent, image stem) -> list of files (first, then extras).
    masks_by_key: dict[tuple[str, str], list[tuple[int, Path]]] = {}
    for mask_file in _list_images(mask_root):
        stem = mask_file.stem
        k = 0
        if mask_re is not None:
            hit = mask_re.search(stem)
            if hit is None:
                if same_dir:
                    continue  # an image, not a mask
                raise DataError(
                    f"{mask_file}: mask name does not end with mask_suffix '{mask_suffix}'"
                )
            stem = stem[: hit.start()]
            k = int(hit.group(1)) if hit.group(1) else 0
        rel = str(mask_file.parent.relative_to(mask_root))
        masks_by_key.setdefault((rel, stem), []).append((k, mask_file))

    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    cases: list[str] = []
    names: list[str] = []
    notes: list[str] = []
    case_pat = re.compile(case_regex) if case_regex else None
    image_files = [
        p for p in _list_images(img_root) if not (same_dir and mask_re and mask_re.search(p.stem))
    ]
    if not image_files:
        raise DataError(f"{img_root}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    for img_path in image_files:
        rel = str(img_path.parent.relative_to(img_root))
        found = masks_by_key.pop((rel, img_path.stem), None)
        if not found:
            raise DataError(
                f"{img_path}: no mask named '{img_path.stem}{mask_suffix}.*' in {mask_root / rel}"
            )
        image = read_image(img_path, channels, channel, max_pixels=max_pixels)
        found.sort()
        mask = None
        for _, mpath in found:
            m, note = read_mask(mpath, max_pixels)
            if note:
                notes.append(note)
            if m.shape != image.shape[:2]:
                raise DataError(
                    f"{mpath}: mask size {m.shape[1]}x{m.shape[0]} differs from its image "
                    f"{img_path.name} ({image.shape[1]}x{image.shape[0]})"
                )
            mask = m if mask is None else np.maximum(mask, m)
        if len(found) > 1:
            notes.append(f"{img_path}: merged {len(found)} masks by union")
        assert mask is not None
        if resize_to is not None:
            image = letterbox(image, resize_to, is_mask=False)
            mask = letterbox(mask, resize_to, is_mask=True)
        images.append(image)
        masks.append(mask)
        names.append(str(Path(rel) / img_path.stem) if rel != "." else img_path.stem)
        if case_pat is not None:
            hit = case_pat.search(img_path.stem)
            if hit is None or not hit.groups():
                raise DataError(f"{img_path}: case_regex {case_regex!r} does not match its name")
            cases.append(hit.group(1))
        else:
            cases.append(names[-1])
    if masks_by_key:
        (rel, stem), files = next(iter(masks_by_key.items()))
        raise DataError(
            f"{files[0][1]}: mask without a matching image '{stem}.*' in {img_root / rel}"
        )
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataError(
            f"{path}: images have different sizes {sorted(shapes)[:3]}; set data.image_size so "
            "they are letterboxed to one size"
        )
    # Collapse repeated notes of one kind into a count, so a log stays readable.
    summary: dict[str, int] = {}
    for n in notes:
        kind = n.split(": ", 1)[1]
        summary[kind] = summary.get(kind, 0) + 1
    return RawClient(
        images=np.stack(images),
        masks=np.stack(masks),
        case_ids=np.array(cases),
        names=np.array(names),
        notes=[f"{path}: {kind} ({count} file(s))" for kind, count in summary.items()],
    )
