"""Folders of image/mask pairs, each image matched to its mask by name."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from fedoap.data.errors import DataError
from fedoap.data.sources.images import IMAGE_EXTENSIONS, read_image, read_mask
from fedoap.data.sources.raw import MAX_IMAGE_PIXELS, RawClient
from fedoap.data.transforms import letterbox


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
