"""The config's sections: frozen dataclasses, one per section, each key commented, with its
default and (numeric keys) its range.

A key added to a section declares the digest version that introduced it, ``since=``
:data:`~fedoap.config.identity.DIGEST_VERSION` (``ranged(..., since=2)``, or
``key(default, since=2)`` for a key without a range), so that runs made before it keep their
identity; a key renamed keeps its earlier name in ``was=`` (:mod:`fedoap.config.keys`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from fedoap.config.keys import key
from fedoap.config.ranges import ranged

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]

#: Largest seed: numpy and torch generators both take any value up to here.
SEED_MAX = 2**32 - 1


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


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
    """A simulated attack, for measuring defences only (``federation.attack``): the named
    clients poison what they send (fedoap.federation.attacks)."""

    # The attacking clients, by name (data.clients).
    clients: tuple[str, ...] = key((), was="sites")
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
    # How the server combines the accepted uploads of the shared parts: a rule registered in
    # fedoap.aggregation.rules.RULES, the example-weighted mean ("mean") or one robust to a
    # minority of bad sites ("median", "trimmed_mean", "krum", "multi_krum").
    aggregator: str = "mean"
    # trimmed_mean: the share of uploads dropped at each end, per coordinate (floor(beta * n)).
    trim_beta: float = ranged(0.25, gt=0, lt=0.5)
    # krum, multi_krum: how many bad clients f to tolerate; needs more than 2 f + 2 sampled.
    num_byzantine: int = ranged(1, ge=0, le=100_000, was="byzantine")
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
    # Measurement only: clients that attack (see AttackConfig); none by default.
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
        settings (:data:`~fedoap.config.identity.EXECUTION_KEYS`), so the same run on a CPU or a
        GPU has one identity (:func:`fedoap.config.identity.config_digest`)."""
        from fedoap.config.identity import config_digest

        return config_digest(self)
