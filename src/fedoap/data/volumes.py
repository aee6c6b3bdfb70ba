"""3D volumes (NIfTI) as 2D slices: the nnU-Net v2 raw layout, the Decathlon layout, plain pairs.

A hospital's segmentation data is 3D: NIfTI volumes in the nnU-Net raw layout
(``imagesTr/<case>_<XXXX>.nii.gz``, ``labelsTr/<case>.nii.gz``, ``dataset.json``), in the Medical
Segmentation Decathlon layout (4D multi-channel images, ``dataset.json`` with ``modality`` and a
``training`` list), or a folder of image/label pairs. This module reads any of them into the
:class:`~fedoap.data.sources.RawClient` of 2D slices the model trains on:

1. one channel is chosen (by its name in ``dataset.json``, or its index);
2. the volume is normalised as a whole: CT clipped to a HU window and scaled to [0, 1], MR clipped
   to per-volume percentiles and z-scored;
3. it is cut along ``axis`` (default: the coarsest spacing, from the header), each slice
   letterboxed to ``data.image_size``;
4. the label values listed as tumour become 1, every other 0;
5. all slices are kept, or those with tumour plus a fraction of the empty ones.

Case ids are the layout's case identifiers, so splits stay per patient. ``fedoap predict`` runs
steps 1-3 through the same functions (:func:`prepare_volume`), then undoes them
(:func:`restore_slices`). Every check runs before any training, and every error names the case
and the file.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedoap.config import ClientSpec, VolumeSpec
from fedoap.data.errors import DataError
from fedoap.data.sources import MAX_IMAGE_PIXELS, MAX_VOLUME_VOXELS, RawClient
from fedoap.data.transforms import letterbox, unletterbox
from fedoap.errors import shown

#: File endings read as NIfTI (through nibabel).
NIFTI_ENDINGS = (".nii.gz", ".nii")

#: nnU-Net's image file name: ``<case>_<XXXX><file_ending>``, XXXX the 4-digit channel index.
NNUNET_IMAGE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")

#: Largest difference between an image's and its label's affine entries (mm) taken as equal.
AFFINE_ATOL = 1e-3

#: Smallest per-volume standard deviation an MR z-score divides by.
MIN_STD = 1e-8


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


@dataclass(frozen=True)
class Case:
    """One case of a volume dataset: its identifier, image file and label file."""

    case_id: str
    image: Path
    label: Path
    channel_index: int | None  # index along a 4D image's 4th axis; None: a 3D file


@dataclass(frozen=True)
class Layout:
    """A volume dataset: its cases, label declaration and the chosen channel's name."""

    cases: tuple[Case, ...]
    declared_labels: frozenset[int] | None  # every value dataset.json declares; None: unknown
    label_names: Mapping[str, tuple[int, ...]]  # name -> values (nnU-Net regions: several)
    channel_name: str | None


def nifti_stem(path: Path) -> str | None:
    """The name of a NIfTI file without its ending, or None if it is not NIfTI."""
    name = path.name
    for ending in NIFTI_ENDINGS:
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return None


#: Most channels a 4D volume's 4th axis may hold (modalities: the Decathlon's BraTS has 4).
MAX_CHANNELS = 16


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


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------


#: Largest dataset.json read: a Decathlon task's, listing a thousand cases, is under 200 KB.
MAX_DATASET_JSON_BYTES = 16 * 2**20

#: A channel index or label value as dataset.json writes it: a plain non-negative integer.
INDEX = re.compile(r"[0-9]{1,9}")


def _read_dataset_json(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if not path.is_file():
        raise DataError(f"{root}: no dataset.json (the nnU-Net and Decathlon layouts need one)")
    try:
        if path.stat().st_size > MAX_DATASET_JSON_BYTES:
            raise DataError(
                f"{path}: {path.stat().st_size:,} bytes, more than a dataset.json holds "
                f"({MAX_DATASET_JSON_BYTES:,} at most)"
            )
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read as JSON: {err}") from None
    except RecursionError:
        raise DataError(f"{path}: cannot read as JSON: nested too deeply") from None
    except ValueError as err:  # an integer past Python's 4300-digit conversion limit
        raise DataError(f"{path}: cannot read as JSON: {err}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: must hold a JSON object")
    return meta


def _channel_names(meta: Mapping[str, Any], key: str, path: Path) -> dict[int, str]:
    """``{"0": "FLAIR", ...}`` of dataset.json's ``key`` as {index: name}."""
    raw = meta.get(key)
    if not isinstance(raw, Mapping) or not raw:
        raise DataError(f"{path}: '{key}' must map channel indices to names, got {shown(raw)}")
    out = {}
    for k, v in raw.items():
        if INDEX.fullmatch(str(k)) is None:
            raise DataError(f"{path}: '{key}' key {str(k)[:40]!r} is not a channel index")
        if not isinstance(v, str):
            raise DataError(f"{path}: {key}.{k}: a channel name must be a string, got {shown(v)}")
        out[int(k)] = v
    return dict(sorted(out.items()))


#: The ``dataset.json`` key that names each layout's channels.
CHANNEL_KEYS = {"nnunet": "channel_names", "msd": "modality"}


def dataset_channel(
    root: Path, source: str, channel: int | str | None
) -> tuple[dict[str, Any], Path, dict[int, str], int, str]:
    """(dataset.json, its path, its channels {index: name}, the chosen index and name)."""
    meta = _read_dataset_json(root)
    jpath = root / "dataset.json"
    names = _channel_names(meta, CHANNEL_KEYS[source], jpath)
    index, name = choose_channel(names, channel, str(jpath))
    return meta, jpath, names, index, name


def choose_channel(
    names: Mapping[int, str], wanted: int | str | None, where: str
) -> tuple[int, str]:
    """(index, name) of the channel ``wanted`` names (or indexes); errors list the channels."""
    shown = ", ".join(f"{i}: {n[:40]}" for i, n in list(names.items())[:20])
    if wanted is None:
        if len(names) == 1:
            return next(iter(names.items()))
        raise DataError(
            f"{where}: the dataset has {len(names)} channels ({shown}); set the client's channel "
            "to the one to train on"
        )
    if isinstance(wanted, int):
        if wanted not in names:
            raise DataError(f"{where}: channel {wanted} does not exist; channels: {shown}")
        return wanted, names[wanted]
    exact = [i for i, n in names.items() if n == wanted]
    loose = [i for i, n in names.items() if n.lower() == wanted.lower()]
    hits = exact or loose
    if len(hits) != 1:
        raise DataError(f"{where}: no channel named {wanted!r}; channels: {shown}")
    return hits[0], names[hits[0]]


def _nnunet_labels(meta: Mapping[str, Any], path: Path) -> dict[str, tuple[int, ...]]:
    """nnU-Net v2 ``labels``: name -> value, or name -> [values] (region-based training)."""
    raw = meta.get("labels")
    if not isinstance(raw, Mapping) or not raw:
        raise DataError(f"{path}: 'labels' must map label names to values, got {shown(raw)}")
    out = {}
    for name, value in raw.items():
        values = value if isinstance(value, list) else [value]
        if not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31 for v in values
        ):
            raise DataError(
                f"{path}: labels.{str(name)[:40]}: must be a label value from 0 to 2^31-1, got "
                f"{shown(value)}"
            )
        out[str(name)] = tuple(values)
    return out


def _msd_labels(meta: Mapping[str, Any], path: Path) -> dict[str, tuple[int, ...]]:
    """Decathlon ``labels``: ``{"0": "background", "1": "edema"}`` as name -> (value,)."""
    raw = meta.get("labels")
    if not isinstance(raw, Mapping) or not raw:
        raise DataError(f"{path}: 'labels' must map label values to names, got {shown(raw)}")
    out: dict[str, tuple[int, ...]] = {}
    for value, name in raw.items():
        if INDEX.fullmatch(str(value)) is None:
            raise DataError(f"{path}: labels key {str(value)[:40]!r} is not a label value")
        if not isinstance(name, str):
            raise DataError(
                f"{path}: labels.{value}: a label name must be a string, got {shown(name)}"
            )
        out[name] = (int(value),)
    return out


def detect_layout(path: Path) -> str | None:
    """``nnunet`` or ``msd`` for a folder whose ``dataset.json`` says which; else None."""
    if not (path / "dataset.json").is_file():
        return None
    meta = _read_dataset_json(path)
    if "channel_names" in meta:
        return "nnunet"
    if "modality" in meta:
        return "msd"
    return None


def nnunet_layout(root: Path, channel: int | str | None) -> Layout:
    """Cases of an nnU-Net v2 raw dataset folder (``imagesTr``, ``labelsTr``, ``dataset.json``)."""
    meta, jpath, names, index, name = dataset_channel(root, "nnunet", channel)
    labels = _nnunet_labels(meta, jpath)
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in NIFTI_ENDINGS:
        raise DataError(
            f"{jpath}: file_ending {shown(ending)}: fedoap reads NIfTI "
            f"({', '.join(NIFTI_ENDINGS)}); convert the volumes first (e.g. SimpleITK's "
            "WriteImage, or dcm2niix for DICOM)"
        )
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise DataError(f"{root}: expected sub-folder '{folder.name}' not found")
    found: dict[str, set[int]] = {}
    for f in sorted(images_dir.iterdir()):
        if f.name.startswith("."):
            continue  # .DS_Store and macOS ._ resource forks
        stem = f.name[: -len(ending)] if f.name.endswith(ending) else None
        hit = NNUNET_IMAGE.match(stem) if stem is not None else None
        if hit is None:
            raise DataError(
                f"{f}: an imagesTr file must be named <case>_<XXXX>{ending} (XXXX: the 4-digit "
                "channel index)"
            )
        found.setdefault(hit["case"], set()).add(int(hit["channel"]))
    if not found:
        raise DataError(f"{images_dir}: no images named <case>_<XXXX>{ending}")
    cases = []
    for case_id, channels in found.items():
        image = images_dir / f"{case_id}_{index:04d}{ending}"
        if index not in channels:
            raise DataError(f"case '{case_id}': no file {image} for channel {index} ({name})")
        odd = sorted(channels - names.keys())
        if odd:
            raise DataError(
                f"case '{case_id}': {images_dir / f'{case_id}_{odd[0]:04d}{ending}'} is channel "
                f"{odd[0]}, which dataset.json's channel_names does not declare"
            )
        label = labels_dir / f"{case_id}{ending}"
        if not label.is_file():
            raise DataError(f"case '{case_id}': no label {label}")
        cases.append(Case(case_id, image, label, None))
    _check_no_orphan_labels(labels_dir, set(found), ending)
    declared = frozenset(v for values in labels.values() for v in values)
    return Layout(tuple(cases), declared, labels, name)


def _check_no_orphan_labels(labels_dir: Path, cases: set[str], ending: str) -> None:
    for f in sorted(labels_dir.iterdir()):
        if f.name.startswith(".") or not f.name.endswith(ending):
            continue
        if f.name[: -len(ending)] not in cases:
            raise DataError(f"{f}: a label without an image in {labels_dir.parent / 'imagesTr'}")


def _inside(root: Path, given: Any, jpath: Path, key: str) -> Path:
    """``root / given``, resolved, refused when ``given`` leads out of the dataset folder (an
    absolute path, or ``..``): a dataset.json must not make fedoap read, train on and cache files
    its owner did not put in the dataset. A file meant to be read from elsewhere is linked into
    the folder, which is the owner's explicit choice."""
    if not isinstance(given, str) or not given.strip() or "\0" in given:
        raise DataError(f"{jpath}: {key} must be a file's path, got {shown(given)}")
    rel = Path(given)
    if rel.is_absolute() or ".." in rel.parts:
        raise DataError(
            f"{jpath}: {key} {shown(given)} leads outside {root}; give a path inside the "
            "dataset folder (link the file into it to read it from elsewhere)"
        )
    return (root / rel).resolve()


def msd_layout(root: Path, channel: int | str | None) -> Layout:
    """Cases of a Decathlon task folder: ``dataset.json``'s ``training`` list, ``modality``."""
    meta, jpath, names, index, name = dataset_channel(root, "msd", channel)
    labels = _msd_labels(meta, jpath)
    training = meta.get("training")
    if not isinstance(training, list) or not training:
        raise DataError(f"{jpath}: 'training' must list {{image, label}} pairs")
    cases = []
    seen: dict[str, int] = {}  # case id -> its index in training
    for k, entry in enumerate(training):
        if not isinstance(entry, Mapping) or "image" not in entry:
            raise DataError(f"{jpath}: training[{k}] must have an 'image' (and a 'label')")
        image = _inside(root, entry["image"], jpath, f"training[{k}].image")
        case_id = nifti_stem(image)
        if case_id is None:
            raise DataError(f"{jpath}: training[{k}].image {shown(entry['image'])} is not NIfTI")
        if case_id in seen:
            raise DataError(
                f"{jpath}: training[{k}] and training[{seen[case_id]}] are both case "
                f"'{case_id}': list each case once"
            )
        seen[case_id] = k
        if not image.is_file():
            raise DataError(f"case '{case_id}': image {image} not found")
        if not entry.get("label"):
            raise DataError(f"case '{case_id}': {jpath}: training[{k}] has no label")
        label = _inside(root, entry["label"], jpath, f"training[{k}].label")
        if not label.is_file():
            raise DataError(f"case '{case_id}': no label {label}")
        # A single-modality task stores 3D images; several modalities are a 4th axis.
        cases.append(Case(case_id, image, label, index if len(names) > 1 else None))
    declared = frozenset(v for values in labels.values() for v in values)
    return Layout(tuple(cases), declared, labels, name)


def folder_layout(
    root: Path,
    image_dir: str,
    mask_dir: str,
    mask_suffix: str,
    case_regex: str | None,
    channel: int | str | None,
) -> tuple[Layout, dict[str, str]]:
    """Image/label NIfTI pairs matched by name: ``<image_dir>/<name>.nii.gz`` and
    ``<mask_dir>/<name><mask_suffix>.nii.gz``. Returns the layout and each case's patient id
    (from ``case_regex``; the name without it)."""
    images_dir, labels_dir = root / image_dir, root / mask_dir
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise DataError(f"{root}: expected sub-folder '{folder.name}' not found")
    labels_by_name: dict[str, Path] = {}
    for f in sorted(labels_dir.iterdir()):
        stem = nifti_stem(f)
        if stem is None or f.name.startswith("."):
            continue
        if mask_suffix and stem.endswith(mask_suffix):
            stem = stem[: -len(mask_suffix)]
        elif mask_suffix and images_dir.resolve() != labels_dir.resolve():
            raise DataError(f"{f}: label name does not end with mask_suffix '{mask_suffix}'")
        elif mask_suffix:
            continue  # an image in a shared folder
        labels_by_name[stem] = f
    pattern = re.compile(case_regex) if case_regex else None
    cases, patients = [], {}
    for f in sorted(images_dir.iterdir()):
        stem = nifti_stem(f)
        if stem is None or f.name.startswith("."):
            continue
        if (
            mask_suffix
            and stem.endswith(mask_suffix)
            and images_dir.resolve() == labels_dir.resolve()
        ):
            continue
        label = labels_by_name.pop(stem, None)
        if label is None:
            raise DataError(f"case '{stem}': no label {labels_dir / (stem + mask_suffix)}.nii[.gz]")
        if pattern is not None:
            hit = pattern.search(stem)
            if hit is None or not hit.groups():
                raise DataError(f"{f}: case_regex {case_regex!r} does not match its name")
            patients[stem] = hit.group(1)
        else:
            patients[stem] = stem
        index = channel if isinstance(channel, int) else None
        cases.append(Case(stem, f, label, index))
    if not cases:
        raise DataError(f"{images_dir}: no NIfTI volumes ({', '.join(NIFTI_ENDINGS)})")
    if labels_by_name:
        stem, f = next(iter(labels_by_name.items()))
        raise DataError(f"{f}: a label without an image '{stem}.nii[.gz]' in {images_dir}")
    return Layout(tuple(cases), None, {}, None), patients


# --------------------------------------------------------------------------------------------
# From a volume to slices, and back
# --------------------------------------------------------------------------------------------


def intensity_kind(v: VolumeSpec, channel_name: str | None) -> str:
    """``ct`` or ``mr``: ``auto`` is ct for a channel named CT (nnU-Net's convention)."""
    if v.intensity != "auto":
        return v.intensity
    return "ct" if channel_name is not None and channel_name.strip().upper() == "CT" else "mr"


def normalise_volume(data: np.ndarray, kind: str, v: VolumeSpec, where: str) -> np.ndarray:
    """The volume's intensities as float32: CT windowed to [0, 1], MR clipped and z-scored.

    Works in float32 with float64 sums: a 512 x 512 x 600 CT is 0.6 GB as float32, twice that
    as float64.
    """
    with np.errstate(over="ignore"):  # values past float32 become inf: handled below
        x = data.astype(np.float32)
    if kind == "ct":
        if v.window is None:
            raise DataError(
                f"{where}: a CT channel needs volume.window (level, width in HU), e.g. [40, 400]"
            )
        level, width = v.window
        lo = level - width / 2
        np.clip(x, lo, lo + width, out=x)
        x -= np.float32(lo)
        x /= np.float32(width)
        return x
    # Beyond float32 (a header's scl_slope of 1e38): scale into range first; the z-score below
    # does not depend on the scale.
    if not np.isfinite(x).all():
        peak = float(np.abs(data).max())
        x = (np.asarray(data, dtype=np.float64) / peak).astype(np.float32)
    lo, hi = np.percentile(x, v.percentiles)
    np.clip(x, lo, hi, out=x)
    mean = float(x.mean(dtype=np.float64))
    x -= np.float32(mean)
    # Plane by plane: a float64 square of the whole volume is the copy this function avoids.
    std = float(np.sqrt(sum(float(np.square(p, dtype=np.float64).sum()) for p in x) / x.size))
    x /= np.float32(max(std, MIN_STD))
    if not np.isfinite(x).all():
        raise DataError(f"{where}: its intensities cannot be normalised in float32")
    return x


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


def tumour_values(layout: Layout, v: VolumeSpec, where: str) -> frozenset[int] | None:
    """The label values that are tumour; None: every non-zero value."""
    if not v.labels:
        return None
    out: set[int] = set()
    for label in v.labels:
        if isinstance(label, int):
            if layout.declared_labels is not None and label not in layout.declared_labels:
                raise DataError(
                    f"{where}: volume.labels value {label} is not declared in dataset.json "
                    f"(declared: {sorted(layout.declared_labels)})"
                )
            out.add(label)
            continue
        if label not in layout.label_names:
            known = ", ".join(layout.label_names) or "none (no dataset.json)"
            raise DataError(f"{where}: volume.labels name {label!r} is unknown; labels: {known}")
        out.update(layout.label_names[label])
    return frozenset(out)


def label_mask(
    label: np.ndarray, declared: frozenset[int] | None, tumour: frozenset[int] | None, where: str
) -> np.ndarray:
    """A label volume as a uint8 {0, 1} tumour mask; undeclared values are errors."""
    if label.dtype.kind == "f":
        rounded = np.rint(label)
        if not np.array_equal(rounded, label):
            raise DataError(f"{where}: label values must be integers, found fractions")
        label = rounded.astype(np.int64)
    values = np.unique(label)
    if declared is not None:
        odd = sorted(set(values.tolist()) - declared)
        if odd:
            raise DataError(
                f"{where}: label values {odd[:8]} are not declared in dataset.json "
                f"(declared: {sorted(declared)})"
            )
    if tumour is None:
        return (label != 0).astype(np.uint8)
    return np.isin(label, sorted(tumour)).astype(np.uint8)


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


def layout_of(spec: ClientSpec, path: Path) -> tuple[Layout, dict[str, str]]:
    """The volume dataset at ``path`` and each case's patient id."""
    if spec.source == "nnunet":
        layout = nnunet_layout(path, spec.channel)
    elif spec.source == "msd":
        layout = msd_layout(path, spec.channel)
    elif spec.source == "volumes":
        return folder_layout(
            path, spec.image_dir, spec.mask_dir, spec.mask_suffix, spec.case_regex, spec.channel
        )
    else:  # pragma: no cover - config validation allows only the three
        raise ValueError(f"not a volume source: {spec.source}")
    return layout, {c.case_id: c.case_id for c in layout.cases}


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


@dataclass(frozen=True)
class VolumeInput:
    """How ``fedoap predict`` turns a client's new volumes into slices, as training did."""

    channel_index: int | None  # along a 4D input's 4th axis; None: inputs are 3D
    channel_file: int | None  # nnU-Net: the ``_XXXX`` index an input's name should carry
    channel_name: str | None
    kind: str  # ct or mr


def volume_input(spec: ClientSpec, dataset_root: Path) -> VolumeInput:
    """The channel and normalisation a volume client was trained with.

    The channel's name comes from the training dataset's ``dataset.json`` when it is reachable,
    else from ``channel`` itself when that is a name. ``intensity: auto`` needs the name; without
    either, the prediction is refused rather than normalised differently from training.
    """
    v = spec.volume
    if spec.source == "volumes":
        index = spec.channel if isinstance(spec.channel, int) else None
        return VolumeInput(index, None, None, intensity_kind(v, None))
    jpath = dataset_root / "dataset.json"
    if jpath.is_file():
        _, _, names, index, name = dataset_channel(dataset_root, spec.source, spec.channel)
        if spec.source == "nnunet":
            return VolumeInput(None, index, name, intensity_kind(v, name))
        return VolumeInput(index if len(names) > 1 else None, None, name, intensity_kind(v, name))
    given = spec.channel if isinstance(spec.channel, str) else None
    if v.intensity == "auto" and given is None:
        raise DataError(
            f"{jpath} not found: the client's channel name, which decides its normalisation "
            "(volume.intensity=auto), is unknown; make the training data reachable under "
            "data.root"
        )
    index = spec.channel if isinstance(spec.channel, int) and spec.source == "msd" else None
    return VolumeInput(index, None, given, intensity_kind(v, given))


def check_input_channel(path: Path, how: VolumeInput) -> None:
    """Refuse an nnU-Net-named input of another channel than the one the model was trained on."""
    if is_other_channel(path, how):
        stem = nifti_stem(path) or ""
        hit = NNUNET_IMAGE.match(stem)
        assert hit is not None and how.channel_file is not None
        raise DataError(
            f"{path}: is channel {hit['channel']} by its name, but the model was trained on "
            f"channel {how.channel_file:04d} ({how.channel_name}); give "
            f"{hit['case']}_{how.channel_file:04d}{path.name[len(stem) :]}"
        )


def is_other_channel(path: Path, how: VolumeInput) -> bool:
    """Whether ``path`` is named as an nnU-Net file of a channel the model was not trained on."""
    hit = NNUNET_IMAGE.match(nifti_stem(path) or "")
    return (
        how.channel_file is not None and hit is not None and int(hit["channel"]) != how.channel_file
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
