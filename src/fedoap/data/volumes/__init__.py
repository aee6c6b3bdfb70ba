"""3D volumes (NIfTI) as 2D slices: the nnU-Net v2 raw layout, the Decathlon layout, plain pairs.

A hospital's segmentation data is 3D: NIfTI volumes in the nnU-Net raw layout
(``imagesTr/<case>_<XXXX>.nii.gz``, ``labelsTr/<case>.nii.gz``, ``dataset.json``), in the Medical
Segmentation Decathlon layout (4D multi-channel images, ``dataset.json`` with ``modality`` and a
``training`` list), or a folder of image/label pairs. This package reads any of them into the
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

One module per job: :mod:`.nifti` reads and writes the files; :mod:`.dataset_json` and
:mod:`.layouts` find the cases and the channel (step 1); :mod:`.normalise` does step 2,
:mod:`.slicing` step 3 and its undoing, :mod:`.labels` step 4; :mod:`.loader` reads a whole client
(step 5); :mod:`.prediction` says how ``fedoap predict`` reads new inputs.
"""

from fedoap.data.volumes.dataset_json import (
    CHANNEL_KEYS,
    INDEX,
    MAX_DATASET_JSON_BYTES,
    choose_channel,
    dataset_channel,
    detect_layout,
    msd_labels,
    nnunet_labels,
)
from fedoap.data.volumes.labels import label_mask, tumour_values
from fedoap.data.volumes.layouts import (
    NNUNET_IMAGE,
    Case,
    Layout,
    folder_layout,
    layout_of,
    msd_layout,
    nnunet_layout,
)
from fedoap.data.volumes.loader import AFFINE_ATOL, load_volumes
from fedoap.data.volumes.nifti import (
    MAX_CHANNELS,
    NIFTI_ENDINGS,
    Volume,
    nifti_stem,
    read_volume,
    write_mask,
)
from fedoap.data.volumes.normalise import MIN_STD, intensity_kind, normalise_volume
from fedoap.data.volumes.prediction import (
    VolumeInput,
    check_input_channel,
    is_other_channel,
    volume_input,
)
from fedoap.data.volumes.slicing import (
    PreparedVolume,
    image_3d,
    prepare_volume,
    restore_slices,
    slice_axis,
)

__all__ = [
    "AFFINE_ATOL",
    "CHANNEL_KEYS",
    "INDEX",
    "MAX_CHANNELS",
    "MAX_DATASET_JSON_BYTES",
    "MIN_STD",
    "NIFTI_ENDINGS",
    "NNUNET_IMAGE",
    "Case",
    "Layout",
    "PreparedVolume",
    "Volume",
    "VolumeInput",
    "check_input_channel",
    "choose_channel",
    "dataset_channel",
    "detect_layout",
    "folder_layout",
    "image_3d",
    "intensity_kind",
    "is_other_channel",
    "label_mask",
    "layout_of",
    "load_volumes",
    "msd_labels",
    "msd_layout",
    "nifti_stem",
    "nnunet_labels",
    "nnunet_layout",
    "normalise_volume",
    "prepare_volume",
    "read_volume",
    "restore_slices",
    "slice_axis",
    "tumour_values",
    "volume_input",
    "write_mask",
]
