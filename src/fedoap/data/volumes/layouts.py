"""The cases of a volume dataset, found by layout: nnU-Net v2 raw (``imagesTr``, ``labelsTr``),
the Medical Segmentation Decathlon (``dataset.json``'s ``training`` list), or a folder of
image/label pairs matched by name."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedoap.config import ClientSpec
from fedoap.data.errors import DataError
from fedoap.data.volumes.dataset_json import dataset_channel, msd_labels, nnunet_labels
from fedoap.data.volumes.nifti import NIFTI_ENDINGS, nifti_stem
from fedoap.errors import shown

#: nnU-Net's image file name: ``<case>_<XXXX><file_ending>``, XXXX the 4-digit channel index.
NNUNET_IMAGE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


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


def nnunet_layout(root: Path, channel: int | str | None) -> Layout:
    """Cases of an nnU-Net v2 raw dataset folder (``imagesTr``, ``labelsTr``, ``dataset.json``)."""
    meta, jpath, names, index, name = dataset_channel(root, "nnunet", channel)
    labels = nnunet_labels(meta, jpath)
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
    labels = msd_labels(meta, jpath)
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
