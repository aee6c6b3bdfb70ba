"""How ``fedoap predict`` reads a volume client's new inputs: the channel and normalisation the
client was trained with, and the refusal of an input named as another channel."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedoap.config import ClientSpec
from fedoap.data.errors import DataError
from fedoap.data.volumes.dataset_json import dataset_channel
from fedoap.data.volumes.layouts import NNUNET_IMAGE
from fedoap.data.volumes.nifti import nifti_stem
from fedoap.data.volumes.normalise import intensity_kind


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
