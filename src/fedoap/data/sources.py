"""Readers for client data: ``.npz`` arrays and folders of image/mask pairs.

Both return a :class:`RawClient`: images (N, H, W) or (N, H, W, 3), masks (N, H, W) in {0, 1},
case ids, and notes about conversions that were made (255-valued masks, thresholded JPEG masks,
merged extra masks). Every check runs here, before any training, and every error names the file.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedoap.data.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LOSSY_EXTENSIONS = (".jpg", ".jpeg")


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


def load_npz(path: Path, use_rgb: bool = False) -> RawClient:
    """Read an ``.npz`` in the format of ``../shared/data`` (see its README)."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            img_key = "images_rgb" if use_rgb else "images"
            missing = {img_key, "masks"} - keys
            if missing:
                raise DataError(f"{path}: missing array(s) {sorted(missing)}; found {sorted(keys)}")
            images = z[img_key]
            masks = z["masks"]
            case_ids = z["case_ids"] if "case_ids" in keys else None
            names = z["names"] if "names" in keys else None
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path}: cannot read as .npz (corrupt or truncated?): {err}") from err

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
        notes=[note] if note else [],
    )


def read_image(path: Path, channels: int, channel: int | None = None) -> np.ndarray:
    """Read one image file as (H, W) (channels=1) or (H, W, 3); errors name the file."""
    try:
        with Image.open(path) as im:
            im.load()  # forces decoding: a truncated file fails here, not later
            arr = np.asarray(im)
    except FileNotFoundError as err:
        raise DataError(f"image file not found: {path}") from err
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


def read_mask(path: Path) -> tuple[np.ndarray, str | None]:
    arr = read_image(path, channels=1)
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
) -> RawClient:
    """Read image/mask pairs from a folder, matching each image to its mask **by name**.

    The mask of ``<image_dir>/<rel>/<stem>.<ext>`` is ``<mask_dir>/<rel>/<stem><mask_suffix>.<any
    ext>``. Extra masks ``<stem><mask_suffix>_<k>`` (BUSI stores a second lesion that way) are
    merged into the first by union. Images are letterboxed to ``resize_to`` as they are read.
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
        image = read_image(img_path, channels, channel)
        found.sort()
        mask = None
        for _, mpath in found:
            m, note = read_mask(mpath)
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
