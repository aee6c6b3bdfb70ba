"""What reading a LiTS-sized CT costs: two synthetic 512 x 512 x 200 int16 volumes (0.7 x 0.7 x 2.5
mm, a liver label 1 and a tumour label 2) in the Decathlon layout, read through ``source: msd``
with a HU window, all slices and then tumour slices plus 10 % of the rest, at image_size 128.

    python benchmarks/volumes/ct_read.py

Prints the seconds per volume, uncached (the preprocessed cache then serves later reads).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from fedoap.config import ClientSpec, VolumeSpec
from fedoap.data.volumes import load_volumes

SHAPE = (512, 512, 200)


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="fedoap-ct-"))
    try:
        rng = np.random.default_rng(0)
        (root / "imagesTr").mkdir()
        (root / "labelsTr").mkdir()
        affine = np.diag([0.7, 0.7, 2.5, 1.0])
        for k in range(2):
            image = rng.integers(-1000, 1500, SHAPE).astype(np.int16)
            label = np.zeros(SHAPE, np.uint8)
            label[100:400, 100:400, 50:150] = 1
            label[200:300, 200:300, 80:120] = 2
            nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"liver_{k}.nii.gz")
            nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"liver_{k}.nii.gz")
        training = [
            {"image": f"./imagesTr/liver_{k}.nii.gz", "label": f"./labelsTr/liver_{k}.nii.gz"}
            for k in range(2)
        ]
        meta = {
            "modality": {"0": "CT"},
            "labels": {"0": "background", "1": "liver", "2": "cancer"},
            "training": training,
        }
        (root / "dataset.json").write_text(json.dumps(meta))
        for slices, fraction in (("all", 0.0), ("foreground", 0.1)):
            volume = VolumeSpec(
                labels=(2,), window=(60.0, 360.0), slices=slices, empty_fraction=fraction
            )
            spec = ClientSpec(name="liver", source="msd", path=str(root), volume=volume)
            t = time.perf_counter()
            raw = load_volumes(spec, root, 128, 10**8)
            dt = time.perf_counter() - t
            print(
                f"2 CT volumes {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} int16, image_size 128, "
                f"slices={slices}: {dt:.1f} s ({dt / 2:.1f} s per volume), "
                f"{len(raw.names)} slices kept"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
