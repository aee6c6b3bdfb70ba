"""Experiment configuration: frozen dataclasses loaded from YAML with dotted overrides.

A run is described by one :class:`Config`. It is read from a YAML file, then command-line
overrides such as ``train.lr=3e-4`` or ``model.kv.mode=bank`` are applied, and the result is
validated field by field. Unknown keys and wrong types fail with an error that names the dotted
key, before any data is read or any run folder is touched.

The resolved config is written to ``RUN_DIR/config.yaml`` and is all that is needed to rebuild a
run (``fedoap run --resume RUN_DIR``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fedoap.errors import FedoapError
from fedoap.fileio import SAFE_NAME, SAFE_NAME_RULE


class ConfigError(FedoapError, ValueError):
    """A configuration value is missing, unknown or of the wrong type. The message names the key."""


CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]

#: Accepted spellings of ``train.device`` (whether the device exists is checked at run time).
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

#: Largest seed: numpy and torch generators both take any value up to here.
SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class Range:
    """The values a numeric config key accepts (``None`` passes: it means "unset")."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def admits(self, v: float) -> bool:
        return not (
            (self.ge is not None and v < self.ge)
            or (self.gt is not None and v <= self.gt)
            or (self.le is not None and v > self.le)
            or (self.lt is not None and v >= self.lt)
        )

    def describe(self) -> str:
        def num(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else f"{v:g}"

        parts = []
        if self.ge is not None:
            parts.append(f">= {num(self.ge)}")
        if self.gt is not None:
            parts.append(f"> {num(self.gt)}")
        if self.le is not None:
            parts.append(f"<= {num(self.le)}")
        if self.lt is not None:
            parts.append(f"< {num(self.lt)}")
        return " and ".join(parts)


def ranged(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field whose value must lie in a range (checked by :func:`check_ranges`, with
    the dotted key in the error). Every int and float key of a config or of a method's options
    declares one (tests/test_config.py checks that none is missing)."""
    return field(default=default, metadata={"range": Range(ge=ge, gt=gt, le=le, lt=lt)})


def check_ranges(obj: Any, prefix: str = "") -> None:
    """Check every ranged field of dataclass ``obj`` (recursively); errors name the dotted key."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        rng: Range | None = f.metadata.get("range")
        if rng is not None:
            # A number, or each number of a tuple (``percentiles: (0.5, 99.5)``); a string
            # (a channel's name) has no range.
            items = value if isinstance(value, tuple) else (value,)
            for item in items:
                numeric = isinstance(item, (int, float)) and not isinstance(item, bool)
                if numeric and not rng.admits(item):
                    raise ConfigError(f"{key}: must be {rng.describe()}, got {value!r}")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_ranges(value, f"{key}.")
        elif isinstance(value, tuple):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item) and not isinstance(item, type):
                    check_ranges(item, f"{key}[{i}].")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


#: Sources of 3D volumes (NIfTI), sliced into 2D images by :mod:`fedoap.data.volumes`.
VOLUME_SOURCES = ("nnunet", "msd", "volumes")


@dataclass(frozen=True)
class VolumeSpec:
    """How a client's 3D volumes become the 2D slices the model trains on.

    Intensities are normalised per volume, before slicing, and those slices reach the network as
    they are: ``data.normalize`` applies to 2D sources only.
    """

    # Label values (or label names from dataset.json) that are tumour, e.g. LiTS [2], BraTS
    # [1, 2, 3]. Empty: every non-zero label. 0 is background, never tumour.
    labels: tuple[int | str, ...] = ranged((), ge=1, le=2**31 - 1)
    # Axis (0, 1 or 2 of the image array) to slice along. None: the axis with the coarsest
    # spacing in the header (the last of equals: axial for the usual RAS/LPS storage).
    axis: int | None = ranged(None, ge=0, le=2)
    # ct: clip to the HU ``window`` (level, width), then scale to [0, 1]. mr: clip each volume to
    # its ``percentiles``, then z-score it. auto: ct when the channel is named "CT" (nnU-Net's
    # convention), else mr.
    intensity: Literal["auto", "mr", "ct"] = "auto"
    window: tuple[float, float] | None = ranged(None, ge=-1e5, le=1e5)
    percentiles: tuple[float, float] = ranged((0.5, 99.5), ge=0, le=100)
    # all: every slice. foreground: slices with tumour, plus ``empty_fraction`` of the others of
    # each volume, drawn with ``seed``.
    slices: Literal["all", "foreground"] = "all"
    empty_fraction: float = ranged(0.0, ge=0, le=1)
    seed: int = ranged(0, ge=0, le=SEED_MAX)


@dataclass(frozen=True)
class ClientSpec:
    """One client (hospital) and where its data comes from.

    ``source`` is ``npz`` (the format of ``../shared/data``), ``folder`` (image/mask pairs matched
    by file stem), ``synthetic`` (the built-in generator, see :mod:`fedoap.data.synthetic`), or
    one of the 3D volume sources (:mod:`fedoap.data.volumes`): ``nnunet`` (the nnU-Net v2 raw
    layout), ``msd`` (the Medical Segmentation Decathlon layout) or ``volumes`` (a folder of
    image/label NIfTI pairs matched by name), cut into 2D slices as ``volume`` says.
    """

    name: str
    source: Literal["npz", "folder", "synthetic", "nnunet", "msd", "volumes"] = "npz"
    # File or folder, relative to ``data.root`` unless absolute. Unused for ``synthetic``.
    path: str | None = None
    # npz: use the ``images_rgb`` array instead of ``images`` (needs ``data.channels=3``).
    use_rgb: bool = False
    # npz: keep only the rows whose arrays have these values, e.g. ``{site: DU}`` or
    # ``{site: [DU, HT]}`` (one hospital of a multi-site file). Values compare as strings.
    where: Mapping[str, Any] = field(default_factory=dict)
    # folder: sub-folders holding the pairs, and the suffix that turns an image stem into its
    # mask stem (``case_1.png`` <-> ``case_1_mask.png``). Pairs are matched by name, never order.
    image_dir: str = "images"
    mask_dir: str = "masks"
    mask_suffix: str = ""
    # folder: a regular expression whose first group, applied to the image stem, is the case
    # (patient) id. Without it every image is its own case.
    case_regex: str | None = None
    # folder: for multi-channel images, which channel to read (None: convert to grayscale).
    # nnunet/msd: the channel's name in dataset.json (``FLAIR``) or its index; None: the only one.
    # volumes: the index along the 4th axis of 4D images.
    channel: int | str | None = ranged(None, ge=0, le=63)
    # nnunet, msd, volumes: how volumes become 2D slices (fedoap.data.volumes).
    volume: VolumeSpec = field(default_factory=lambda: VolumeSpec())
    # synthetic: the "organ/modality" style and number of images (see fedoap.data.synthetic).
    style: str | None = None
    num_images: int = ranged(240, ge=6, le=1_000_000)
    seed: int = ranged(0, ge=0, le=SEED_MAX)


@dataclass(frozen=True)
class SplitConfig:
    """Patient-level train/val/test fractions. Cases (``case_ids``) never straddle splits."""

    train: float = ranged(0.7, gt=0, lt=1)
    val: float = ranged(0.15, gt=0, lt=1)
    test: float = ranged(0.15, gt=0, lt=1)
    # Fixed separately from the run seed, so every method and seed sees the same split.
    seed: int = ranged(0, ge=0, le=SEED_MAX)
    # True: the split seed is the run's ``seed`` (``seed`` above is set to it), so a study's
    # seeds draw different patients into train/val/test and its intervals include the
    # variance of the split. Methods compared at one seed still share one split.
    follow_run_seed: bool = False


@dataclass(frozen=True)
class AugmentConfig:
    """Online augmentation of training batches (never applied to val/test)."""

    enabled: bool = False
    flip: bool = True
    rotate_deg: float = ranged(10.0, ge=0, le=180)  # uniform in [-rotate_deg, rotate_deg]
    intensity: float = ranged(
        0.1, ge=0, lt=1
    )  # scale ~ U[1-i, 1+i], shift ~ U[-i, i] on normalised intensities


@dataclass(frozen=True)
class DataConfig:
    # Folder that relative client paths are resolved against. Users point it at their own data.
    root: str = "../shared/data"
    clients: tuple[ClientSpec, ...] = ()
    image_size: int = ranged(128, ge=2, le=4096)
    channels: int = ranged(1, ge=1, le=3)
    # Per-image z-score suits MRI, ultrasound and endoscopy alike (no calibrated intensities).
    normalize: Literal["zscore", "unit"] = "zscore"
    split: SplitConfig = field(default_factory=SplitConfig)
    # Caps keep CPU runs short. Caps subsample within a split, so splits stay patient-level.
    max_train_images: int | None = ranged(None, ge=1)
    # Train on at most this many cases (patients) of the training split, drawn with the split
    # seed; the validation and test splits are untouched, so a study can vary only how much a
    # hospital trains on. The draws are nested: the 2 cases kept at 2 are among the 4 kept at
    # 4. Applied before max_train_images.
    max_train_cases: int | None = ranged(None, ge=1)
    max_val_images: int | None = ranged(None, ge=1)
    max_test_images: int | None = ranged(None, ge=1)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Preprocessed cache: each client's images letterboxed to image_size once and stored on disk,
    # keyed by the source files and these settings (fedoap.data.cache). An execution setting:
    # it never changes a result, so it is not part of a run's identity (Config.digest).
    cache: bool = True
    # None: $FEDOAP_CACHE_DIR, else ~/.cache/fedoap.
    cache_dir: str | None = None
    # Largest image (height x width, read from the file's header before decoding) that is
    # accepted, from a folder, an npz or `fedoap predict`: a 164 KB PNG can declare 13000^2
    # pixels and cost 2 GB to decode. 50 MP is ~7000^2, far beyond any scan we letterbox to
    # image_size. A safety limit, not part of a run's identity.
    max_image_pixels: int = ranged(50_000_000, ge=1)
    # Largest 3D volume (voxels over every axis, from the NIfTI header or the DICOM headers,
    # before any voxel is read): a 75-byte .nii.gz can declare 2000 x 2000 x 150 float32 and
    # cost 2.4 GB. 300 M fits the largest public CT volumes (LiTS: 512 x 512 x 987). A safety
    # limit, not part of a run's identity.
    max_volume_voxels: int = ranged(300_000_000, ge=1)


@dataclass(frozen=True)
class KVConfig:
    """How the shared keys/values of the decoupled cross-attention are aggregated (method.md).

    ``weights``: the server averages the K/V branch and projections only.
    ``bank``: in addition each client uploads a bounded summary of its K/V tokens over its
    training set and the server merges them into a global bank that every client's queries also
    attend to.
    """

    mode: Literal["weights", "bank"] = "weights"
    # kmeans: ``bank_size`` prototypes per client, concatenated by the server (K*bank_size tokens).
    # token_mean: per-position mean over the training set (h*w tokens), averaged by the server.
    summary: Literal["kmeans", "token_mean"] = "kmeans"
    bank_size: int = ranged(16, ge=1, le=65536)
    # Images used to compute the summary (bounded cost; a statistic over many images).
    summary_images: int = ranged(256, ge=1)
    kmeans_iters: int = ranged(10, ge=1, le=10_000)


@dataclass(frozen=True)
class ModelConfig:
    width: int = ranged(
        16, ge=2, le=1024
    )  # w: encoder widths w, 2w, 4w, 8w; bottleneck 16w. The paper uses 64.
    # Encoder levels (widths w..w*2^(depth-1)); the bottleneck pools once more to w*2^depth
    # channels, so the attention sees (size/2^depth)^2 tokens: 8x8 = 64 at 128^2 with depth 4.
    depth: int = ranged(4, ge=1, le=6)
    heads: int = ranged(4, ge=1, le=1024)
    norm: Literal["instance", "batch", "group"] = "instance"
    use_dca: bool = True
    use_adapter: bool = True
    kv: KVConfig = field(default_factory=KVConfig)


@dataclass(frozen=True)
class TrainConfig:
    lr: float = ranged(1e-3, gt=0)
    weight_decay: float = ranged(1e-5, ge=0)
    batch_size: int = ranged(16, ge=1, le=65536)
    local_epochs: int = ranged(1, ge=1, le=10_000)
    # Autocast dtype for convolutions and matmuls; weights, optimiser state, losses and uploads
    # stay fp32. auto: bf16 where the device computes it natively (a CUDA GPU with bf16, a CPU
    # with AVX512-BF16 or AMX), fp32 elsewhere (a CPU without them emulates bf16 about ten
    # times slower); a run resolves it at start and records the result, which is part of the
    # run's identity. bf16 / fp32: forced. fp16: autocast with a GradScaler (GPUs without bf16).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # Validation metric that selects each client's model. case_dice: each case's (patient's)
    # pixels pooled, so an empty prediction on a patient with tumour scores 0. dice: per image,
    # where every tumour-free slice predicted empty scores 1, which rewards quiet models over
    # ones that find the tumour. In the scarcity study (docs/scarcity.md) selecting on dice lost
    # 6 to 10 points of per-patient Dice against case_dice. With one image per case they agree.
    select_metric: Literal["dice", "case_dice"] = "case_dice"
    # 0: use every core torch sees.
    num_threads: int = ranged(0, ge=0, le=4096)
    # --- Execution settings: where and how the same experiment runs. They are not part of a
    # run's identity (Config.digest), so a run, a resume or a benchmark cell is the same
    # experiment on a CPU or a GPU (fedoap.training.device).
    # auto: CUDA if there is one, else the CPU. Or cpu, cuda, cuda:N, mps.
    device: str = "auto"
    # torch.compile the model once per process (every client's weights load into that one
    # compiled module). compile_mode "reduce-overhead" adds CUDA graphs (small, launch-bound
    # models on a GPU); it is ignored on the CPU.
    compile: bool = False
    compile_mode: CompileMode = "default"
    # channels_last memory format for convolutions. None: on for CUDA, off elsewhere.
    channels_last: bool | None = None
    # Allow TF32 tensor cores for fp32 matmuls and convolutions on CUDA (faster, ~1e-3 relative
    # error); off keeps fp32 exact.
    tf32: bool = False
    # Bit-for-bit repeatable CUDA runs: deterministic kernels only, no cuDNN autotuning
    # (cudnn.benchmark is on otherwise). Costs speed; the CPU path is deterministic anyway.
    deterministic: bool = False
    # A client whose loss or weights become non-finite (NaN/inf: too high a learning rate, or
    # badly scaled inputs) never reaches the aggregate or the results. stop: the run fails with
    # exit code 2, naming the client, round and step; the last checkpoint is intact. exclude:
    # that client is dropped from the rest of the run and reported in summary.json without
    # test scores; the others go on.
    on_divergence: Literal["stop", "exclude"] = "stop"
    # Images per forward pass in validation and test (no gradients, so large batches fit).
    eval_batch_size: int = ranged(256, ge=1, le=65536)


@dataclass(frozen=True)
class PBLConfig:
    """Perturbed boundary loss (method.md, "Perturbed boundary loss")."""

    enabled: bool = True
    region: Literal["error", "band", "error_and_band"] = "error"
    tau: float = ranged(0.75, ge=0, le=1)  # error threshold on |sigma(z) - y|
    s: float = ranged(0.1, ge=0)  # perturbation scale
    lam: float = ranged(0.1, ge=0, le=1)  # weight of the perturbed term
    band_width: int = ranged(
        2, ge=1, le=1024
    )  # b, pixels either side of a boundary for region=band


@dataclass(frozen=True)
class FinetuneConfig:
    """Local personalisation stage after the federated rounds (only for methods that have one)."""

    epochs: int = ranged(2, ge=0, le=100_000)
    lr: float | None = ranged(None, gt=0)  # None: train.lr
    parts: Literal["all", "personal"] = "all"
    # Early stopping: a site stops fine-tuning once its validation score has not improved for
    # this many epochs (the model it started from counts as epoch 0); None: every epoch runs.
    # Selection already keeps the best epoch; stopping saves the epochs after it.
    patience: int | None = ranged(None, ge=1)
    pbl: PBLConfig = field(default_factory=PBLConfig)


@dataclass(frozen=True)
class SafeguardConfig:
    """A per-site final stage that keeps a site from ending up worse than alone
    (fedoap.federation.safeguard). Each site also trains a local-only model (the method's
    network on its own data, with ``local``'s protocol and budget) and keeps, by its validation
    score, the personalised federated model, the local one (``choose``), or the best point
    ``alpha * local + (1 - alpha) * federated`` of ``alphas`` (``interpolate``). The local model
    never leaves the site."""

    mode: Literal["none", "choose", "interpolate"] = "none"
    # interpolate: the grid of alpha; it must hold 0 (the federated model) and 1 (the local).
    alphas: tuple[float, ...] = ranged((0.0, 0.25, 0.5, 0.75, 1.0), ge=0, le=1)


@dataclass(frozen=True)
class AttackConfig:
    """A simulated attack, for measuring defences only (``federation.attack``): the named sites
    poison what they send (fedoap.federation.attacks)."""

    sites: tuple[str, ...] = ()
    # nan: NaN uploads. scale: the update (upload - global) x1000. sign_flip: the update negated.
    # noise: Gaussian noise with the update's norm, instead of the update. invert_masks: honest
    # training on inverted training masks (data poisoning).
    kind: Literal["nan", "scale", "sign_flip", "noise", "invert_masks"] = "scale"


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = ranged(5, ge=1, le=1_000_000)
    fraction: float = ranged(1.0, gt=0, le=1)  # share of clients sampled each round (at least one)
    # inprocess: every client in this process (default). flower-sim: the same algorithm objects
    # through Flower's simulation runtime (needs the [flower] extra).
    runtime: Literal["inprocess", "flower-sim"] = "inprocess"
    # Write the resume checkpoint after every k-th round and fine-tuning epoch (always at the end
    # of each stage). A paper-scale checkpoint (4 clients, w=64) is 2.8 GB, 8-10 s to write on
    # our CPU machine; a killed run resumes exactly from the last one written. An execution
    # setting (not part of Config.digest).
    checkpoint_every: int = ranged(1, ge=1)
    # Flower: how long the server waits for a step's replies before it counts a silent site as
    # lost, and the share of the sites sampled to train that must reply for a round to count
    # (fewer: the run stops, resumable). In-process no site can be lost: both are unused there.
    round_timeout_s: float = ranged(3600.0, gt=0)
    min_fit_fraction: float = ranged(1.0, gt=0, le=1)
    # How the server combines the accepted uploads of the shared parts (fedoap.federation.robust):
    # the example-weighted mean, or a rule robust to a minority of bad sites.
    aggregator: Literal["mean", "median", "trimmed_mean", "krum", "multi_krum"] = "mean"
    # trimmed_mean: the share of uploads dropped at each end, per coordinate (floor(beta * n)).
    trim_beta: float = ranged(0.25, gt=0, lt=0.5)
    # krum, multi_krum: how many bad sites f to tolerate; needs more than 2 f + 2 sampled sites.
    byzantine: int = ranged(1, ge=0, le=100_000)
    # An upload whose update norm ||upload - global|| exceeds this many times the round's median
    # update norm is refused (recorded in summary.json ``refused``). None: no norm check.
    max_update_norm_ratio: float | None = ranged(10.0, gt=1)
    # Flower: a site that declares more training images than this at join is refused. Each
    # site reports its own count, and the example-weighted mean trusts it: without a bound, one
    # site declaring 10^9 images would carry the whole average. None: no bound. In-process the
    # server counts the images itself.
    max_train_examples: int | None = ranged(None, ge=1, le=2**62)
    # False: no defence, for measuring what an attack does without one. The server then checks
    # only what aggregation needs to run at all (keys, shapes, dtypes): non-finite values, a
    # wrong example count and outlying norms go into the aggregate.
    validate_updates: bool = True
    # Measurement only: sites that attack (see AttackConfig); none by default.
    attack: AttackConfig = field(default_factory=AttackConfig)


@dataclass(frozen=True)
class SampleDPConfig:
    """``privacy.dp``: DP-SGD at every site (Opacus; fedoap.privacy): Poisson sampling,
    per-unit gradient clipping, Gaussian noise, and an accountant over every step the site
    takes, fine-tuning included. The unit is an image (sample-level) or, with ``unit: case``, a
    patient or video with all its images. Give a target ``epsilon`` (the noise is chosen to
    spend it over the run's planned steps) or a ``noise_multiplier`` (the epsilon it spends is
    reported)."""

    enabled: bool = False
    epsilon: float | None = ranged(None, gt=0)
    noise_multiplier: float | None = ranged(None, gt=0)
    # None: 1 / (10 n) for a site with n training units (stated in summary.json per site).
    delta: float | None = ranged(None, gt=0, lt=1)
    max_grad_norm: float = ranged(1.0, gt=0)
    accountant: Literal["prv", "rdp"] = "prv"
    # What one privacy unit is. image: each training image (sample-level DP-SGD). case: each
    # case (patient or video) with all its images: cases are Poisson-sampled, each case's
    # gradient (of its images' mean loss) is clipped, and train.batch_size counts cases.
    unit: Literal["image", "case"] = "image"


@dataclass(frozen=True)
class ClientDPConfig:
    """``privacy.client_dp``: client-level DP (DP-FedAvg; McMahan et al. 2018): the server
    clips each site's update of the shared weights to ``clip_norm``, averages them with equal
    weights and adds Gaussian noise of std ``noise_multiplier * clip_norm / K`` to the mean;
    an RDP accountant over the rounds gives the (epsilon, delta) of a whole site's data."""

    enabled: bool = False
    clip_norm: float = ranged(1.0, gt=0)
    noise_multiplier: float = ranged(1.0, gt=0)
    # None: 1 / (10 K) for K sites.
    delta: float | None = ranged(None, gt=0, lt=1)


@dataclass(frozen=True)
class PrivacyConfig:
    dp: SampleDPConfig = field(default_factory=SampleDPConfig)
    client_dp: ClientDPConfig = field(default_factory=ClientDPConfig)


@dataclass(frozen=True)
class Config:
    method: str = "fedoap"
    seed: int = ranged(0, ge=0, le=SEED_MAX)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    safeguard: SafeguardConfig = field(default_factory=SafeguardConfig)
    # Method-specific options, validated against the chosen method's ``Options`` dataclass.
    algorithm: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        split = self.data.split
        if split.follow_run_seed and split.seed != self.seed:
            # The one place the split seed is resolved: every reader of data.split sees it.
            data = dataclasses.replace(self.data, split=dataclasses.replace(split, seed=self.seed))
            object.__setattr__(self, "data", data)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        """Short stable hash of the experiment: the resolved config without its execution
        settings (:data:`EXECUTION_KEYS`), so the same run on a CPU or a GPU has one identity."""
        plain = self.to_dict()
        for dotted in EXECUTION_KEYS:
            section, key = dotted.split(".")
            plain[section].pop(key, None)
        for dotted, default in DIGEST_WHEN_SET.items():
            section, key = dotted.split(".", 1)
            if key.startswith("clients[]."):  # a key of every client spec
                for client in plain[section]["clients"]:
                    if client.get(key.removeprefix("clients[].")) == default:
                        client.pop(key.removeprefix("clients[]."), None)
                continue
            *parents, last = key.split(".")  # a key of a nested section, e.g. privacy.dp.unit
            where = plain[section]
            for part in parents:
                where = where.get(part) if isinstance(where, dict) else None
            if isinstance(where, dict) and where.get(last) == default:
                where.pop(last, None)
        for section in DIGEST_SECTIONS_WHEN_SET:  # a later section left empty: as if absent
            if not plain.get(section):
                plain.pop(section, None)
        blob = json.dumps(plain, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


#: Keys added after runs already existed that change a result only when set: left out of
#: :meth:`Config.digest` at their default, so earlier runs keep their identity (and resume).
DIGEST_WHEN_SET: dict[str, Any] = {
    "train.on_divergence": "stop",
    "data.clients[].where": {},
    # As the plain form Config.to_dict gives it (tuples as lists).
    "data.clients[].volume": json.loads(json.dumps(dataclasses.asdict(VolumeSpec()))),
    "federation.aggregator": "mean",
    "federation.trim_beta": 0.25,
    "federation.byzantine": 1,
    "federation.max_update_norm_ratio": 10.0,
    "federation.validate_updates": True,
    "federation.max_train_examples": None,
    "federation.attack": {"sites": [], "kind": "scale"},
    "privacy.dp": json.loads(json.dumps(dataclasses.asdict(SampleDPConfig()))),
    "privacy.client_dp": json.loads(json.dumps(dataclasses.asdict(ClientDPConfig()))),
    # After privacy.dp: a default privacy.dp (unit included) is dropped whole first.
    "privacy.dp.unit": "image",
    "data.max_train_cases": None,
    "finetune.patience": None,
    "data.split.follow_run_seed": False,
    "safeguard.mode": "none",
    "safeguard.alphas": list(SafeguardConfig().alphas),
}

#: Sections added after runs already existed: dropped from the digest when every key of them is
#: at its default (DIGEST_WHEN_SET).
DIGEST_SECTIONS_WHEN_SET = ("privacy", "safeguard")

#: Settings that decide where and how fast a run executes, not what it computes (up to float
#: rounding): left out of :meth:`Config.digest`. ``train.num_threads`` predates this list and
#: stays in the digest; benchmark cells zero it (fedoap.bench.digest).
EXECUTION_KEYS = (
    "train.device",
    "train.compile",
    "train.compile_mode",
    "train.channels_last",
    "train.tf32",
    "train.deterministic",
    "train.eval_batch_size",
    "data.cache",
    "data.cache_dir",
    "data.max_image_pixels",
    "data.max_volume_voxels",
    "federation.checkpoint_every",
    "federation.round_timeout_s",
    "federation.min_fit_fraction",
)


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{key}: expected a mapping of {_type_name(tp)} fields, got {value!r}"
            )
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_short(value)}")
        if not -(2**63) <= value < 2**63:
            raise ConfigError(f"{key}: {_short(value)} is out of range (a 64-bit integer)")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_short(value)}")
        try:
            out = float(value)
        except OverflowError:  # an int beyond the float range
            out = math.inf
        if not math.isfinite(out):
            raise ConfigError(f"{key}: must be a finite number, got {_short(value)}")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_short(value)}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")  # pragma: no cover


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters so an error stays one readable line."""
    if isinstance(value, int) and abs(value) >= 10**40:
        # its repr is useless in a message, and past 4300 digits Python refuses to make it
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        raise ConfigError(f"{prefix or '<root>'}: config keys must be names, got {odd[0]!r}")
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys under "
            f"'{prefix.rstrip('.') or '<root>'}' are: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


#: Most nodes a YAML document may expand to once its aliases are resolved. A config has a few
#: hundred; nine levels of nine aliases ("billion laughs") expand to 9^9 and took 23 GB.
MAX_YAML_NODES = 100_000


def load_yaml(text: str, where: str, max_nodes: int = MAX_YAML_NODES) -> Any:
    """``yaml.safe_load`` that first bounds the document's size with its aliases expanded.

    Aliases are resolved only when Python objects are built; the node graph is composed
    without expanding them, so its expanded size is counted (each shared node once per use)
    and a bomb is refused before it costs memory. Errors name ``where``."""
    loader = None
    try:
        # The reader checks every character as the loader is built: a NUL byte fails here.
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, where, max_nodes)
        return loader.construct_document(node)
    except ConfigError:
        raise
    except yaml.reader.ReaderError as err:
        code = err.character if isinstance(err.character, int) else ord(err.character)
        line = text.count("\n", 0, err.position) + 1
        raise ConfigError(
            f"{where}: not valid YAML: character U+{code:04X} at line {line} is not allowed"
        ) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = err.problem or err.context or "cannot parse"
        raise ConfigError(f"{where}: not valid YAML: {what}{at}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None
    except ValueError as err:  # e.g. an integer past Python's 4300-digit conversion limit
        what = "a number has more than 4300 digits" if "digits" in str(err) else str(err)
        raise ConfigError(f"{where}: not valid YAML: {what}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _expanded_size(root: yaml.Node, where: str, limit: int) -> int:
    sizes: dict[int, int] = {}  # id(node) -> nodes it expands to
    open_: set[int] = set()  # nodes being counted: meeting one again is a recursive alias

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise ConfigError(f"{where}: a YAML anchor contains an alias to itself")
        open_.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            _refuse_duplicate_keys(node, where)
            total += sum(size(k) + size(v) for k, v in node.value)
        open_.discard(key)
        if total > limit:
            raise ConfigError(
                f"{where}: the YAML expands to more than {limit:,} nodes once its aliases "
                "(*name) are resolved; a config needs a few hundred (an alias bomb?)"
            )
        sizes[key] = total
        return total

    return size(root)


def _refuse_duplicate_keys(node: yaml.MappingNode, where: str) -> None:
    """YAML keeps the last of two equal keys; in a config that hides the first silently."""
    seen: set[str] = set()
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            continue
        if key.value in seen:
            mark = key.start_mark
            raise ConfigError(
                f"{where}: duplicate key {key.value[:80]!r} at line {mark.line + 1}, column "
                f"{mark.column + 1} (YAML would keep only the last one)"
            )
        seen.add(key.value)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part")
    value = load_yaml(raw, f"override {key}") if raw.strip() else ""
    # YAML reads 3e-4 as a string (it wants 3.0e-4); be forgiving for numbers.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value) if any(c in value for c in ".eE") else int(value)
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply dotted overrides to a nested plain dict (in a copy)."""
    out = _copy_tree(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _copy_tree(node: Any) -> Any:
    """A copy of the mappings and lists of a loaded YAML document (scalars are shared)."""
    if isinstance(node, dict):
        return {k: _copy_tree(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_copy_tree(v) for v in node]
    return node


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read the config file: {err}") from None
        loaded = load_yaml(text, str(path))
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded
    data = apply_overrides(data, overrides)
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Every key's range (:func:`ranged`), then the cross-field checks that ranges cannot
    express. Errors name the dotted key."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    check_ranges(cfg)
    d = cfg.data
    need(len(d.clients) >= 1, "data.clients: at least one client is needed")
    names = [c.name for c in d.clients]
    need(len(set(names)) == len(names), f"data.clients: duplicate client names in {names}")
    for i, c in enumerate(d.clients):
        # A client's name becomes a file name (best/<name>.safetensors) and a CSV cell: it
        # cannot be "..", hidden, an option or a formula.
        need(
            SAFE_NAME.fullmatch(c.name) is not None,
            f"data.clients[{i}].name: {_short(c.name)} is not a usable name: a client's name "
            f"names its checkpoint file, so it is {SAFE_NAME_RULE}",
        )
        if c.source == "synthetic":
            need(c.style is not None, f"data.clients[{i}].style: required for a synthetic client")
        else:
            need(c.path is not None, f"data.clients[{i}].path: required for source={c.source}")
        need(
            not c.where or c.source == "npz",
            f"data.clients[{i}].where: selects rows of an npz; source={c.source} has none",
        )
        for key, value in c.where.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            need(
                isinstance(key, str)
                and bool(values)
                and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values),
                f"data.clients[{i}].where.{key}: must be a value or a list of values (strings "
                f"or integers), got {value!r}",
            )
        need(
            not (c.use_rgb and d.channels != 3), f"data.clients[{i}].use_rgb needs data.channels=3"
        )
        _validate_volume_options(c, f"data.clients[{i}]", need)
    _validate_aggregator(cfg, need)
    _validate_privacy(cfg, need)
    _validate_safeguard(cfg, need)
    need(d.channels in (1, 3), f"data.channels: must be 1 or 3, got {d.channels}")
    s = d.split
    need(abs(s.train + s.val + s.test - 1.0) < 1e-6, "data.split: train + val + test must sum to 1")
    m = cfg.model
    need(
        d.image_size % (2**m.depth) == 0,
        f"data.image_size={d.image_size} must be a multiple of 2^model.depth={2**m.depth}",
    )
    c_bottleneck = m.width * 2**m.depth
    need(
        c_bottleneck % m.heads == 0,
        f"model.heads={m.heads} must divide the bottleneck width "
        f"model.width*2^model.depth={c_bottleneck}",
    )
    t = cfg.train
    need(
        bool(DEVICE_PATTERN.fullmatch(t.device)),
        f"train.device: must be auto, cpu, cuda, cuda:N or mps, got {t.device!r}",
    )
    need(
        not (t.on_divergence == "exclude" and cfg.federation.runtime != "inprocess"),
        "train.on_divergence=exclude: only the inprocess runtime can drop a client; on Flower a "
        "diverged client fails the round (use train.on_divergence=stop)",
    )


def _validate_aggregator(cfg: Config, need: Callable[[bool, str], None]) -> None:
    """An aggregator's option only with that aggregator; Krum only where it can hold."""
    f = cfg.federation
    defaults = FederationConfig()
    need(
        f.aggregator == "trimmed_mean" or f.trim_beta == defaults.trim_beta,
        f"federation.trim_beta: only used by federation.aggregator=trimmed_mean, not "
        f"{f.aggregator}",
    )
    krum = f.aggregator in ("krum", "multi_krum")
    need(
        krum or f.byzantine == defaults.byzantine,
        f"federation.byzantine: only used by federation.aggregator=krum or multi_krum, not "
        f"{f.aggregator}",
    )
    need(
        f.validate_updates or f.max_update_norm_ratio == defaults.max_update_norm_ratio,
        "federation.max_update_norm_ratio: not used with federation.validate_updates=false (no "
        "update is checked)",
    )
    names = [c.name for c in cfg.data.clients]
    for i, site in enumerate(f.attack.sites):
        need(
            site in names,
            f"federation.attack.sites[{i}]: {site!r} is not a client; clients: {', '.join(names)}",
        )
    need(
        bool(f.attack.sites) or f.attack.kind == defaults.attack.kind,
        "federation.attack.kind: no federation.attack.sites attack",
    )
    if krum:
        n = len(cfg.data.clients)
        sampled = max(1, round(f.fraction * n))
        need(
            sampled > 2 * f.byzantine + 2,
            f"federation.byzantine={f.byzantine}: {f.aggregator} needs more than 2 f + 2 = "
            f"{2 * f.byzantine + 2} sites per round (f < n/2 - 1), and {sampled} are sampled "
            f"of {n}; lower f, or use median or trimmed_mean",
        )


def _validate_privacy(cfg: Config, need: Callable[[bool, str], None]) -> None:
    """DP options only when enabled, and each mechanism with settings its accountant can use.
    (Which methods support DP is the method's business: fedoap.algorithms.base.)"""
    p, defaults = cfg.privacy, PrivacyConfig()
    dp, cdp = p.dp, p.client_dp
    if not dp.enabled:
        need(
            dp == defaults.dp,
            "privacy.dp: options given but privacy.dp.enabled is false (set it to true)",
        )
    else:
        need(
            (dp.epsilon is None) != (dp.noise_multiplier is None),
            "privacy.dp: give exactly one of epsilon (a target over the run) or "
            "noise_multiplier; the accountant needs the noise, or a budget to choose it from",
        )
        need(
            cfg.train.precision != "fp16",
            "train.precision=fp16: its loss scaling cannot be combined with per-example "
            "clipping (privacy.dp); use fp32 or bf16",
        )
        need(
            not cfg.train.compile,
            "train.compile: per-example gradients (privacy.dp) need Opacus's hooks, which a "
            "compiled model bypasses; set train.compile=false",
        )
        need(
            cfg.train.channels_last is not True,
            "train.channels_last=true: Opacus sums per-example gradients in the contiguous "
            "layout, and CUDA's fused AdamW refuses gradients whose strides differ from their "
            "weights'; leave it unset (off under privacy.dp) or false",
        )
        need(
            cfg.model.kv.mode != "bank",
            "model.kv.mode=bank: its K/V summaries are computed from private features and are "
            "not accounted by privacy.dp; use model.kv.mode=weights under DP",
        )
    if not cdp.enabled:
        need(
            cdp == defaults.client_dp,
            "privacy.client_dp: options given but privacy.client_dp.enabled is false",
        )
    else:
        need(
            cfg.federation.aggregator == "mean",
            f"privacy.client_dp: DP-FedAvg clips and averages the updates itself; "
            f"federation.aggregator={cfg.federation.aggregator} cannot be combined with it",
        )
        need(
            cfg.federation.fraction == 1.0,
            "privacy.client_dp: its accountant assumes every site takes part in every round; "
            f"federation.fraction={cfg.federation.fraction} is not supported yet",
        )
        need(
            cfg.model.kv.mode != "bank",
            "model.kv.mode=bank: the K/V summaries are not clipped or noised by privacy.client_dp",
        )


def _validate_safeguard(cfg: Config, need: Callable[[bool, str], None]) -> None:
    """The safeguard with a method and settings it can serve; its grid only where it is used."""
    sg, defaults = cfg.safeguard, SafeguardConfig()
    if sg.mode != "interpolate":
        need(
            sg.alphas == defaults.alphas,
            f"safeguard.alphas: only used by safeguard.mode=interpolate, not {sg.mode}",
        )
    if sg.mode == "none":
        return
    need(
        cfg.method != "local",
        "safeguard.mode: method local is the local model already; the safeguard is for "
        "federated methods",
    )
    need(
        not cfg.privacy.dp.enabled,
        "safeguard.mode: its local-only model is trained without DP-SGD, and a site's "
        "privacy.dp budget would not cover the model it keeps; not supported with privacy.dp",
    )
    if sg.mode == "interpolate":
        need(
            0.0 in sg.alphas and 1.0 in sg.alphas,
            f"safeguard.alphas: must hold 0 (the federated model) and 1 (the local model), got "
            f"{list(sg.alphas)}",
        )
        need(
            cfg.model.kv.mode != "bank",
            "safeguard.mode=interpolate: a model attending to the global K/V bank "
            "(model.kv.mode=bank) cannot be averaged with one that never saw it; use "
            "safeguard.mode=choose",
        )


def _validate_volume_options(c: ClientSpec, key: str, need: Callable[[bool, str], None]) -> None:
    """Volume options only where volumes are read, and consistent; errors name the key."""
    v = c.volume
    if c.source not in VOLUME_SOURCES:
        need(
            v == VolumeSpec(),
            f"{key}.volume: slices 3D volumes; source={c.source} has none (use source nnunet, "
            "msd or volumes)",
        )
        need(
            not isinstance(c.channel, str),
            f"{key}.channel: a channel name ({c.channel!r}) needs a dataset.json (source nnunet "
            "or msd); source={c.source} takes a channel index",
        )
        return
    need(
        c.source != "volumes" or not isinstance(c.channel, str),
        f"{key}.channel: source=volumes has no dataset.json to name channels; give the index",
    )
    need(not c.use_rgb, f"{key}.use_rgb: volumes are single-channel; use channel to pick one")
    if c.source in ("nnunet", "msd"):  # their layout fixes the folders and names
        for opt, default in (("image_dir", "images"), ("mask_dir", "masks"), ("mask_suffix", "")):
            need(
                getattr(c, opt) == default,
                f"{key}.{opt}: source={c.source} reads its layout's own folders "
                "(imagesTr/labelsTr, or dataset.json's training list); only source=volumes "
                f"takes {opt}",
            )
    need(
        c.case_regex is None or c.source == "volumes",
        f"{key}.case_regex: source={c.source} takes case ids from its layout",
    )
    lo, hi = v.percentiles
    need(
        0 <= lo < hi <= 100,
        f"{key}.volume.percentiles: must be (low, high) with 0 <= low < high <= 100, got "
        f"{list(v.percentiles)}",
    )
    if v.window is not None:
        need(
            v.window[1] > 0,
            f"{key}.volume.window: (level, width) needs width > 0, got {list(v.window)}",
        )
    need(
        v.intensity != "ct" or v.window is not None,
        f"{key}.volume.window: intensity=ct needs a HU window (level, width), e.g. [40, 400]",
    )
    need(
        v.intensity != "mr" or v.window is None,
        f"{key}.volume.window: intensity=mr uses percentiles, not a window",
    )
    need(
        v.slices == "foreground" or v.empty_fraction == 0.0,
        f"{key}.volume.empty_fraction: only used with slices=foreground",
    )


def save_config(cfg: Config, path: Path) -> None:
    from fedoap.fileio import atomic_write_text

    atomic_write_text(path, cfg.to_yaml())
