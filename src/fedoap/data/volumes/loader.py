"""A volume client as the 2D slices it trains on: every case read, checked and sliced."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from fedoap.config import ClientSpec, VolumeSpec
from fedoap.data.errors import DataError
from fedoap.data.sources.raw import MAX_VOLUME_VOXELS, RawClient
from fedoap.data.transforms import letterbox
from fedoap.data.volumes.labels import label_mask, tumour_values
from fedoap.data.volumes.layouts import Case, Layout, layout_of
from fedoap.data.volumes.nifti import Volume, read_volume
from fedoap.data.volumes.normalise import intensity_kind
from fedoap.data.volumes.slicing import image_3d, prepare_volume, slice_axis

#: Largest difference between an image's and its label's affine entries (mm) taken as equal.
AFFINE_ATOL = 1e-3


def _keep_slices(masks: np.ndarray, v: VolumeSpec, case_id: str) -> np.ndarray:
    """Indices of the slices kept: all, or the tumour slices plus a seeded share of the rest."""
    if v.slices == "all":
        return np.arange(len(masks))
    has = masks.reshape(len(masks), -1).any(1)
    empty = np.flatnonzero(~has)
    n = int(round(v.empty_fraction * len(empty)))
    # One stream per case, so a case's slices do not depend on which other cases are present.
    rng = np.random.default_rng([v.seed, zlib.crc32(case_id.encode())])
    chosen = rng.choice(empty, size=n, replace=False) if n else np.empty(0, np.int64)
    return np.sort(np.concatenate([np.flatnonzero(has), chosen])).astype(np.int64)


def _read_case(
    case: Case,
    layout: Layout,
    tumour: frozenset[int] | None,
    max_pixels: int,
    max_voxels: int = MAX_VOLUME_VOXELS,
) -> tuple[Volume, np.ndarray, np.ndarray]:
    """(image volume, 3D image, 3D mask) of one case, checked against each other."""
    where = f"case '{case.case_id}'"
    try:
        vol = read_volume(case.image, max_pixels, max_voxels)
        lab = read_volume(case.label, max_pixels, max_voxels)
    except DataError as err:  # name the case as well as the file
        raise DataError(f"{where}: {err}") from None
    image = image_3d(vol, case.channel_index, where)
    if lab.data.ndim == 4:
        raise DataError(f"{where}: label {case.label} is 4D {lab.data.shape}; labels are 3D")
    if lab.data.shape[:3] != image.shape[:3]:
        raise DataError(
            f"{where}: image {case.image} has shape {image.shape} but label {case.label} has "
            f"{lab.data.shape[:3]}"
        )
    if not np.allclose(vol.affine, lab.affine, atol=AFFINE_ATOL, rtol=0):
        diff = float(np.abs(vol.affine - lab.affine).max())
        raise DataError(
            f"{where}: image {case.image} and label {case.label} have different affines "
            f"(largest difference {diff:.4g} mm): they are not in the same space"
        )
    mask = label_mask(
        np.asarray(lab.data), layout.declared_labels, tumour, f"{where}: {case.label}"
    )
    return vol, image, mask


def load_volumes(
    spec: ClientSpec,
    path: Path,
    size: int,
    max_pixels: int,
    max_voxels: int = MAX_VOLUME_VOXELS,
) -> RawClient:
    """A volume client as 2D slices letterboxed to ``size``; errors name the case and file.

    Every case is read and checked before any slice is returned, so a bad case anywhere fails the
    run before training.
    """
    if not path.is_dir():
        raise DataError(f"data folder not found: {path}")
    layout, patients = layout_of(spec, path)
    v = spec.volume
    tumour = tumour_values(layout, v, str(path))
    kind = intensity_kind(v, layout.channel_name)
    if kind == "ct" and v.window is None:  # before any volume is read
        raise DataError(
            f"{path}: channel '{layout.channel_name}' is CT: it needs volume.window (level, "
            "width in HU), e.g. [40, 400]"
        )
    images, masks, cases, names = [], [], [], []
    axes: set[int] = set()
    for case in layout.cases:
        vol, image, mask3d = _read_case(case, layout, tumour, max_pixels, max_voxels)
        where = f"case '{case.case_id}': {case.image}"
        axis = slice_axis(v, vol.zooms)
        axes.add(axis)
        m = np.moveaxis(mask3d, axis, 0)
        keep = _keep_slices(m, v, case.case_id)
        images.append(prepare_volume(image, vol.zooms, kind, v, size, where, keep).slices)
        masks.append(
            np.stack([letterbox(m[k], size, is_mask=True) for k in keep])
            if len(keep)
            else np.zeros((0, size, size), np.uint8)
        )
        cases += [patients[case.case_id]] * len(keep)
        names += [f"{case.case_id}_s{k:04d}" for k in keep]
    if not names:
        raise DataError(f"{path}: no slices kept (volume.slices={v.slices}, no tumour found)")
    notes = [
        f"{path}: {len(layout.cases)} volumes, {len(names)} slices along axis "
        f"{'/'.join(map(str, sorted(axes)))}, {kind.upper()} normalisation"
        + (f" of channel '{layout.channel_name}'" if layout.channel_name else "")
    ]
    return RawClient(
        images=np.concatenate(images),
        masks=np.concatenate(masks).astype(np.uint8),
        case_ids=np.array(cases),
        names=np.array(names),
        notes=notes,
    )
