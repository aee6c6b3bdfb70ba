"""Build nnU-Net-layout NIfTI datasets from ``../shared/data/lgg_brain_mri.npz``, in a temporary
folder (the LGG licence forbids redistributing them: never write them into the repository).

Each patient's FLAIR slices are stacked, in slice order, into one volume of shape (128, 128, Z)
with a plausible spacing: the 256 x 256 scans were letterboxed to 128, so 1.875 mm in plane, and
the slices are 3 mm apart (coarsest: the slicing axis is the last).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: Voxel spacing (mm) of the built volumes.
SPACING = (1.875, 1.875, 3.0)


def lgg_volumes(
    npz: Path, patients: int | None = None, sites: Sequence[str] | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{patient: (image (128, 128, Z) uint8, label (128, 128, Z) uint8)}, slices in order."""
    with np.load(npz) as d:  # each array once: indexing d[...] per case re-reads the zip
        images, masks = d["images"], d["masks"]
        case_ids, order, site = d["case_ids"], d["slice_index"], d["site"]
    first_site = dict(zip(case_ids.tolist(), site.tolist(), strict=True))
    wanted = [
        c for c in dict.fromkeys(case_ids.tolist()) if sites is None or first_site[c] in sites
    ]
    out = {}
    for case in wanted[:patients]:
        rows = np.flatnonzero(case_ids == case)
        rows = rows[np.argsort(order[rows], kind="stable")]
        out[case] = (
            np.moveaxis(images[rows], 0, -1),
            np.moveaxis(masks[rows], 0, -1),
        )
    return out


def affine(offset: float = 0.0) -> np.ndarray:
    a = np.diag([*SPACING, 1.0])
    a[:3, 3] = (-120.0 + offset, -120.0, -60.0)
    return a


def write_nnunet(
    root: Path, volumes: dict[str, tuple[np.ndarray, np.ndarray]], name: str = "FLAIR"
) -> Path:
    """``root`` as an nnU-Net v2 raw dataset: imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz
    and dataset.json."""
    import nibabel as nib

    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case, (image, label) in volumes.items():
        nib.save(nib.Nifti1Image(image, affine()), root / "imagesTr" / f"{case}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine()), root / "labelsTr" / f"{case}.nii.gz")
    meta = {
        "channel_names": {"0": name},
        "labels": {"background": 0, "tumour": 1},
        "numTraining": len(volumes),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root
