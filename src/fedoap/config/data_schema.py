"""The config's ``data`` section: the clients and where their images come from, the split of
each client's cases, the caps, the augmentation and the preprocessed cache. Each key says what
it means (``doc``), beside its default and (numeric keys) its range (:mod:`fedoap.config.keys`,
:mod:`fedoap.config.ranges`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fedoap.config.keys import key
from fedoap.config.ranges import ranged

#: Largest seed: numpy and torch generators both take any value up to here.
SEED_MAX = 2**32 - 1

#: Sources of 3D volumes (NIfTI), sliced into 2D images by :mod:`fedoap.data.volumes`.
VOLUME_SOURCES = ("nnunet", "msd", "volumes")


@dataclass(frozen=True)
class VolumeSpec:
    """How a client's 3D volumes become the 2D slices the model trains on.

    Intensities are normalised per volume, before slicing, and those slices reach the network as
    they are: ``data.normalize`` applies to 2D sources only.
    """

    labels: tuple[int | str, ...] = ranged(
        (),
        ge=1,
        le=2**31 - 1,
        doc="Label values (or label names from `dataset.json`) that are tumour, e.g. LiTS "
        "`[2]`, BraTS `[1, 2, 3]`. Empty: every non-zero label. 0 is background, never tumour.",
    )
    axis: int | None = ranged(
        None,
        ge=0,
        le=2,
        doc="Axis (0, 1 or 2 of the image array) to slice along. null: the axis with the "
        "coarsest spacing in the header (the last of equals: axial for the usual RAS/LPS "
        "storage).",
    )
    intensity: Literal["auto", "mr", "ct"] = key(
        "auto",
        doc="How a volume's intensities are normalised. `ct`: clipped to the HU `window`, then "
        "scaled to [0, 1]. `mr`: clipped to the volume's `percentiles`, then z-scored. `auto`: "
        '`ct` when the channel is named "CT" (nnU-Net\'s convention), else `mr`.',
    )
    window: tuple[float, float] | None = ranged(
        None,
        ge=-1e5,
        le=1e5,
        doc="`ct`: the HU window `[level, width]` (width > 0), e.g. `[40, 400]`; required for "
        "CT, refused with `intensity: mr`.",
    )
    percentiles: tuple[float, float] = ranged(
        (0.5, 99.5),
        ge=0,
        le=100,
        doc="`mr`: the `[low, high]` percentiles of each volume its intensities are clipped to "
        "before z-scoring (0 <= low < high <= 100).",
    )
    slices: Literal["all", "foreground"] = key(
        "all",
        doc="Which slices of a volume are kept. `all`: every slice. `foreground`: the slices "
        "with tumour, plus `empty_fraction` of the others of each volume, drawn with `seed`.",
    )
    empty_fraction: float = ranged(
        0.0,
        ge=0,
        le=1,
        doc="`slices: foreground`: the share of each volume's tumour-free slices that is kept too.",
    )
    seed: int = ranged(
        0,
        ge=0,
        le=SEED_MAX,
        doc="Seed of the draw of tumour-free slices (`slices: foreground`), per volume.",
    )


@dataclass(frozen=True)
class ClientSpec:
    """One client (hospital) and where its data comes from.

    ``source`` is ``npz`` (the format of ``../shared/data``), ``folder`` (image/mask pairs matched
    by file stem), ``synthetic`` (the built-in generator, see :mod:`fedoap.data.synthetic`), or
    one of the 3D volume sources (:mod:`fedoap.data.volumes`): ``nnunet`` (the nnU-Net v2 raw
    layout), ``msd`` (the Medical Segmentation Decathlon layout) or ``volumes`` (a folder of
    image/label NIfTI pairs matched by name), cut into 2D slices as ``volume`` says.
    """

    name: str = key(
        doc="The client's (hospital's) name, unique in the federation. It names the client's "
        "rows in the results and its checkpoint file, so it is 1 to 128 letters, digits and "
        "`. _ + -`, starting with a letter, a digit or `_`.",
    )
    source: Literal["npz", "folder", "synthetic", "nnunet", "msd", "volumes"] = key(
        "npz",
        doc="Where the images come from. `npz`: an `.npz` file (the format of "
        "`../shared/data`). `folder`: image/mask pairs matched by file stem. `synthetic`: the "
        "built-in generator. `nnunet` (the nnU-Net v2 raw layout), `msd` (the Medical "
        "Segmentation Decathlon layout), `volumes` (a folder of image/label NIfTI pairs "
        "matched by name): 3D volumes, cut into 2D slices as `volume` says.",
    )
    path: str | None = key(
        None,
        doc="File or folder of the client's data, relative to `data.root` unless absolute. "
        "Required for every source but `synthetic`, which ignores it.",
    )
    use_rgb: bool = key(
        False,
        doc="`npz`: use the `images_rgb` array instead of `images` (needs `data.channels: 3`).",
    )
    where: Mapping[str, Any] = key(
        default_factory=dict,
        doc="`npz`: keep only the rows whose arrays have these values, e.g. `{site: DU}` or "
        "`{site: [DU, HT]}` (one hospital of a multi-site file). Values compare as strings.",
    )
    image_dir: str = key(
        "images",
        doc="`folder`, `volumes`: the sub-folder (of `path`) holding the images.",
    )
    mask_dir: str = key(
        "masks",
        doc="`folder`, `volumes`: the sub-folder (of `path`) holding the masks (label maps).",
    )
    mask_suffix: str = key(
        "",
        doc="`folder`, `volumes`: the suffix that turns an image stem into its mask stem "
        "(`case_1.png` <-> `case_1_mask.png`). Pairs are matched by name, never by order.",
    )
    case_regex: str | None = key(
        None,
        doc="`folder`, `volumes`: a regular expression whose first group, applied to the image "
        "stem, is the case (patient) id. null: every image is its own case.",
    )
    channel: int | str | None = ranged(
        None,
        ge=0,
        le=63,
        doc="Which channel to read. `folder`: the channel of multi-channel images (null: "
        "convert to grayscale). `nnunet`, `msd`: the channel's name in `dataset.json` "
        "(`FLAIR`) or its index; null: the only one. `volumes`: the index along the 4th axis "
        "of 4D images.",
    )
    volume: VolumeSpec = key(
        default_factory=VolumeSpec,
        doc="`nnunet`, `msd`, `volumes`: how the client's 3D volumes become 2D slices.",
    )
    style: str | None = key(
        None,
        doc="`synthetic` (required there): the organ and modality imitated: `mri`, "
        "`ultrasound`, `endoscopy` or `ct`.",
    )
    num_images: int = ranged(
        240,
        ge=6,
        le=1_000_000,
        doc="`synthetic`: the number of images generated (whole cases, the last one cut to "
        "the count).",
    )
    seed: int = ranged(
        0,
        ge=0,
        le=SEED_MAX,
        doc="`synthetic`: the generator's seed; the images follow from (seed, style, name).",
    )


@dataclass(frozen=True)
class SplitConfig:
    """Patient-level train/val/test fractions. Cases (``case_ids``) never straddle splits."""

    train: float = ranged(
        0.7,
        gt=0,
        lt=1,
        doc="Share of each client's cases (patients) in the training split: the cases that "
        "validation and test leave. `train + val + test` must be 1.",
    )
    val: float = ranged(
        0.15,
        gt=0,
        lt=1,
        doc="Share of each client's cases in the validation split (rounded, at least one "
        "case), which selects each client's model.",
    )
    test: float = ranged(
        0.15,
        gt=0,
        lt=1,
        doc="Share of each client's cases in the test split (rounded, at least one case), "
        "which scores the selected models.",
    )
    seed: int = ranged(
        0,
        ge=0,
        le=SEED_MAX,
        doc="Seed of the split, fixed separately from the run's `seed`, so every method and "
        "seed sees the same split.",
    )
    follow_run_seed: bool = key(
        False,
        doc="true: the split seed is the run's `seed` (`seed` above is set to it), so a "
        "study's seeds draw different patients into train/val/test and its intervals include "
        "the variance of the split. Methods compared at one seed still share one split.",
    )


@dataclass(frozen=True)
class AugmentConfig:
    """Online augmentation of training batches (never applied to val/test)."""

    enabled: bool = key(
        False, doc="Augment training batches online (validation and test never are)."
    )
    flip: bool = key(
        True, doc="Flip each image vertically and horizontally, each with probability 1/2."
    )
    rotate_deg: float = ranged(
        10.0,
        ge=0,
        le=180,
        doc="Largest rotation, in degrees: each image turns by an angle uniform in "
        "[-rotate_deg, rotate_deg] (0: none).",
    )
    intensity: float = ranged(
        0.1,
        ge=0,
        lt=1,
        doc="Intensity jitter i on the normalised image: scale ~ U[1 - i, 1 + i], shift ~ "
        "U[-i, i] (0: none).",
    )


@dataclass(frozen=True)
class DataConfig:
    root: str = key(
        "../shared/data",
        doc="The folder that relative client paths are resolved against; users point it at "
        "their own data.",
    )
    clients: tuple[ClientSpec, ...] = key(
        (),
        doc="The clients (hospitals) of the federation, at least one, each with its own data.",
    )
    image_size: int = ranged(
        128,
        ge=2,
        le=4096,
        doc="Side of the square images the model sees: every image is letterboxed to it "
        "(aspect kept, padded). It must be a multiple of 2^depth (`model.depth`).",
    )
    channels: int = ranged(
        1,
        ge=1,
        le=3,
        doc="Image channels the model reads: 1 (grayscale) or 3 (RGB).",
    )
    normalize: Literal["zscore", "unit"] = key(
        "zscore",
        doc="Intensity normalisation of 2D images. `zscore`: per image, which suits MRI, "
        "ultrasound and endoscopy alike (no calibrated intensities). `unit`: uint8 scaled to "
        "[0, 1], other images unscaled. Volume slices come normalised per volume "
        "(`data.clients[].volume.intensity`).",
    )
    split: SplitConfig = key(
        default_factory=SplitConfig,
        doc="Each client's cases (patients) split into train, validation and test. A case "
        "never straddles two splits.",
    )
    max_train_images: int | None = ranged(
        None,
        ge=1,
        doc="Cap on each client's training images, drawn with the split seed within the "
        "training split (so splits stay patient-level), e.g. to keep CPU runs short. null: "
        "no cap.",
    )
    max_train_cases: int | None = ranged(
        None,
        ge=1,
        doc="Train on at most this many cases (patients) of the training split, drawn with "
        "the split seed; validation and test are untouched, so a study can vary only how much "
        "a hospital trains on. The draws are nested: the 2 cases kept at 2 are among the 4 "
        "kept at 4. Applied before `max_train_images`. null: every case.",
    )
    max_val_images: int | None = ranged(
        None,
        ge=1,
        doc="Cap on each client's validation images: whole cases, drawn at random, up to "
        "this many images (at least one case). null: no cap.",
    )
    max_test_images: int | None = ranged(
        None,
        ge=1,
        doc="Cap on each client's test images: whole cases, drawn at random, up to this many "
        "images (at least one case). null: no cap.",
    )
    augment: AugmentConfig = key(
        default_factory=AugmentConfig,
        doc="Online augmentation of training batches: flips, small rotations, intensity jitter.",
    )
    cache: bool = key(
        True,
        doc="Keep a preprocessed cache: each client's images letterboxed to `image_size` once "
        "and stored on disk, keyed by the source files and these settings. It never changes a "
        "result.",
    )
    cache_dir: str | None = key(
        None,
        doc="Folder of the preprocessed cache. null: `$FEDOAP_CACHE_DIR`, else `~/.cache/fedoap`.",
    )
    max_image_pixels: int = ranged(
        50_000_000,
        ge=1,
        doc="Largest image (height x width, read from the file's header before decoding) that "
        "is accepted, from a folder, an npz or `fedoap predict`: a 164 KB PNG can declare "
        "13000^2 pixels and cost 2 GB to decode. 50 MP is about 7000^2, far beyond any scan "
        "letterboxed to `image_size`. A safety limit.",
    )
    max_volume_voxels: int = ranged(
        300_000_000,
        ge=1,
        doc="Largest 3D volume (voxels over every axis, from the NIfTI or DICOM headers, "
        "before any voxel is read): a 75-byte .nii.gz can declare 2000 x 2000 x 150 float32 "
        "and cost 2.4 GB. 300 M fits the largest public CT volumes (LiTS: 512 x 512 x 987). "
        "A safety limit.",
    )
