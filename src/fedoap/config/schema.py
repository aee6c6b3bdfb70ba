"""The config's sections: frozen dataclasses, one per section, each key with what it means
(``doc``), its default and (numeric keys) its range: ``model``, ``train`` and ``finetune``
here, with the :class:`Config` that holds them all; ``data`` in :mod:`fedoap.config.data_schema`;
``federation``, ``privacy`` and ``safeguard`` in :mod:`fedoap.config.federation_schema`.
:mod:`fedoap.config.reference` turns them into the configuration reference.

A key added to a section declares the digest version that introduced it, ``since=``
:data:`~fedoap.config.identity.DIGEST_VERSION` (``ranged(..., since=2)``, or
``key(default, since=2)`` for a key without a range), so that runs made before it keep their
identity; a key renamed keeps its earlier name in ``was=`` (:mod:`fedoap.config.keys`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from fedoap.config.data_schema import SEED_MAX, DataConfig
from fedoap.config.federation_schema import FederationConfig, PrivacyConfig, SafeguardConfig
from fedoap.config.keys import key
from fedoap.config.ranges import ranged
from fedoap.config.tracking_schema import TrackingConfig

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


@dataclass(frozen=True)
class KVConfig:
    """How the shared keys/values of the decoupled cross-attention are aggregated (method.md)."""

    mode: Literal["weights", "bank"] = key(
        "weights",
        doc="`weights`: the server averages the K/V branch and projections only. `bank`: in "
        "addition each client uploads a bounded summary of its K/V tokens over its training "
        "set, and the server merges them into a global bank that every client's queries also "
        "attend to.",
    )
    summary: Literal["kmeans", "token_mean"] = key(
        "kmeans",
        doc="`bank`: a client's summary. `kmeans`: `bank_size` prototypes per client, "
        "concatenated by the server (K x bank_size tokens). `token_mean`: the per-position "
        "mean over the training set (h x w tokens), averaged by the server.",
    )
    bank_size: int = ranged(16, ge=1, le=65536, doc="`kmeans`: prototypes per client.")
    summary_images: int = ranged(
        256,
        ge=1,
        doc="`bank`: the training images a summary is computed from, at most (a bounded cost; "
        "a statistic over many images).",
    )
    kmeans_iters: int = ranged(
        10, ge=1, le=10_000, doc="`kmeans`: Lloyd iterations (after k-means++ seeding)."
    )


@dataclass(frozen=True)
class ModelConfig:
    width: int = ranged(
        16,
        ge=2,
        le=1024,
        doc="Base width w of the U-Net: its encoder levels have w, 2w, 4w, ... channels and "
        "its bottleneck w x 2^depth (16w at depth 4). The paper uses 64.",
    )
    depth: int = ranged(
        4,
        ge=1,
        le=6,
        doc="Encoder levels (widths w .. w x 2^(depth-1)); the bottleneck pools once more to "
        "w x 2^depth channels, so the attention sees (image_size / 2^depth)^2 tokens: 8 x 8 = "
        "64 at 128^2 with depth 4.",
    )
    heads: int = ranged(
        4,
        ge=1,
        le=1024,
        doc="Attention heads at the bottleneck (methods with attention); they divide its "
        "width, w x 2^depth.",
    )
    norm: Literal["instance", "batch", "group"] = key(
        "instance",
        doc="Normalisation in every convolution block: `instance` (InstanceNorm, affine), "
        "`batch` (BatchNorm), `group` (GroupNorm, up to 8 groups).",
    )
    use_dca: bool = key(
        True,
        doc="fedoap: the decoupled cross-attention at the bottleneck (personal queries, shared "
        "keys and values); false: no attention (an ablation).",
    )
    use_adapter: bool = key(
        True,
        doc="fedoap: the personal spatial adapter between decoder and head; false: none (an "
        "ablation).",
    )
    kv: KVConfig = key(
        default_factory=KVConfig,
        doc="fedoap: how the shared keys and values of the cross-attention are aggregated.",
    )


@dataclass(frozen=True)
class TrainConfig:
    lr: float = ranged(
        1e-3,
        gt=0,
        doc="AdamW learning rate of local training (of fine-tuning too, unless `finetune.lr`).",
    )
    weight_decay: float = ranged(1e-5, ge=0, doc="AdamW's (decoupled) weight decay.")
    batch_size: int = ranged(
        16,
        ge=1,
        le=65536,
        doc="Training images per step (cases with `privacy.dp.unit: case`; under `privacy.dp` "
        "the expected size of a Poisson-sampled batch).",
    )
    local_epochs: int = ranged(
        1,
        ge=1,
        le=10_000,
        doc="Passes over a client's training set in each federated round.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = key(
        "auto",
        doc="Autocast dtype for convolutions and matmuls; weights, optimiser state, losses and "
        "uploads stay fp32. `auto`: bf16 where the device computes it natively (a CUDA GPU "
        "with bf16, a CPU with AVX512-BF16 or AMX), fp32 elsewhere (a CPU without them "
        "emulates bf16 about ten times slower); a run resolves it at start and records the "
        "result, which is part of the run's identity. `bf16`, `fp32`: forced. `fp16`: "
        "autocast with a GradScaler (GPUs without bf16).",
    )
    select_metric: Literal["dice", "case_dice"] = key(
        "case_dice",
        doc="Validation metric that selects each client's model. `case_dice`: each case's "
        "(patient's) pixels pooled, so an empty prediction on a patient with tumour scores 0. "
        "`dice`: per image, where every tumour-free slice predicted empty scores 1, which "
        "rewards quiet models over ones that find the tumour. In the scarcity study "
        "(docs/results/scarcity.md) selecting on `dice` lost 6 to 10 points of per-patient Dice "
        "against `case_dice`. With one image per case they agree.",
    )
    num_threads: int = ranged(
        0, ge=0, le=4096, doc="CPU threads torch uses; 0: every core torch sees."
    )
    # device .. deterministic and eval_batch_size are execution settings (where and how the
    # same experiment runs): outside a run's identity (identity.EXECUTION_KEYS).
    device: str = key(
        "auto",
        doc="Where the run trains. `auto`: CUDA if there is one, else the CPU. Or `cpu`, "
        "`cuda`, `cuda:N`, `mps`.",
    )
    compile: bool = key(
        False,
        doc="torch.compile the model once per process (every client's weights load into that "
        "one compiled module).",
    )
    compile_mode: CompileMode = key(
        "default",
        doc="`compile`: torch.compile's mode. `reduce-overhead` adds CUDA graphs (small, "
        "launch-bound models on a GPU); on the CPU it runs as `default`.",
    )
    channels_last: bool | None = key(
        None,
        doc="channels_last memory format for convolutions. null: on for CUDA, off elsewhere "
        "(and off under `privacy.dp`).",
    )
    tf32: bool = key(
        False,
        doc="Allow TF32 tensor cores for fp32 matmuls and convolutions on CUDA (faster, about "
        "1e-3 relative error); off keeps fp32 exact.",
    )
    deterministic: bool = key(
        False,
        doc="Bit-for-bit repeatable CUDA runs: deterministic kernels only, no cuDNN autotuning "
        "(cudnn.benchmark is on otherwise). Costs speed; the CPU path is deterministic "
        "anyway.",
    )
    on_divergence: Literal["stop", "exclude"] = key(
        "stop",
        doc="A client whose loss or weights become non-finite (NaN/inf: too high a learning "
        "rate, or badly scaled inputs) never reaches the aggregate or the results. `stop`: the "
        "run fails with exit code 2, naming the client, round and step; the last checkpoint "
        "is intact. `exclude` (in-process runtime only): that client is dropped from the rest "
        "of the run and reported in summary.json without test scores; the others go on.",
    )
    eval_batch_size: int = ranged(
        256,
        ge=1,
        le=65536,
        doc="Images per forward pass in validation and test (no gradients, so large batches fit).",
    )


@dataclass(frozen=True)
class PBLConfig:
    """Perturbed boundary loss (method.md, "Perturbed boundary loss")."""

    enabled: bool = key(
        True,
        doc="Fine-tune with the perturbed boundary loss; false: with the plain segmentation loss.",
    )
    region: Literal["error", "band", "error_and_band"] = key(
        "error",
        doc="The pixels whose logits are perturbed. `error`: where the error |sigmoid(z) - y| "
        "exceeds `tau` (the reference). `band`: within `band_width` pixels of the true or the "
        "predicted boundary. `error_and_band`: both.",
    )
    tau: float = ranged(0.75, ge=0, le=1, doc="`error`: the threshold on |sigmoid(z) - y|.")
    s: float = ranged(0.1, ge=0, doc="Scale of the Gaussian noise added to the logits.")
    lam: float = ranged(
        0.1,
        ge=0,
        le=1,
        doc="Weight of the perturbed term: (1 - lam) L_seg(z, y) + lam L_seg(z perturbed, y); "
        "0: the plain loss.",
    )
    band_width: int = ranged(
        2, ge=1, le=1024, doc="`band`: b, the pixels either side of a boundary."
    )


@dataclass(frozen=True)
class FinetuneConfig:
    """Local personalisation stage after the federated rounds (only for methods that have one)."""

    epochs: int = ranged(
        2,
        ge=0,
        le=100_000,
        doc="Epochs of local fine-tuning after the federated rounds, for the methods that "
        "have that stage (0: none).",
    )
    lr: float | None = ranged(None, gt=0, doc="Fine-tuning learning rate; null: `train.lr`.")
    parts: Literal["all", "personal"] = key(
        "all",
        doc="What fine-tuning trains. `all`: every parameter. `personal`: only the method's "
        "personal parts, the shared ones kept as federated.",
    )
    patience: int | None = ranged(
        None,
        ge=1,
        doc="Early stopping: a site stops fine-tuning once its validation score has not "
        "improved for this many epochs (the model it started from counts as epoch 0); null: "
        "every epoch runs. Selection already keeps the best epoch; stopping saves the epochs "
        "after it.",
    )
    pbl: PBLConfig = key(
        default_factory=PBLConfig,
        doc="fedoap: the perturbed boundary loss of its fine-tuning stage (docs/method.md).",
    )


@dataclass(frozen=True)
class Config:
    method: str = key(
        "fedoap",
        doc="The method, by its registered name: `fedoap`, or a baseline of docs/baselines.md "
        "(`fedavg`, `fedprox`, `ditto`, `local`, `centralized`, ...). An unknown name lists "
        "the known ones.",
    )
    seed: int = ranged(
        0,
        ge=0,
        le=SEED_MAX,
        doc="Seed of the run: model initialisation, batch order, augmentation, client "
        "sampling, DP noise. The data split has its own (`data.split.seed`).",
    )
    data: DataConfig = key(
        default_factory=DataConfig,
        doc="The clients and their data: where the images come from, how each client's cases "
        "are split, caps, augmentation and the preprocessed cache.",
    )
    model: ModelConfig = key(
        default_factory=ModelConfig,
        doc="The network: a U-Net every method shares, with FedOAP's attention and adapter.",
    )
    train: TrainConfig = key(
        default_factory=TrainConfig,
        doc="Local training: optimiser, batches, precision, model selection, and where and how "
        "it runs.",
    )
    federation: FederationConfig = key(
        default_factory=FederationConfig,
        doc="The federated rounds: sampling, runtime, checkpoints, aggregation and its defences.",
    )
    finetune: FinetuneConfig = key(
        default_factory=FinetuneConfig,
        doc="Local personalisation stage after the federated rounds (only for methods that "
        "have one).",
    )
    privacy: PrivacyConfig = key(
        default_factory=PrivacyConfig,
        doc="Differential privacy, off by default: DP-SGD at each site (`dp`) or client-level "
        "DP at the server (`client_dp`). See docs/privacy.md.",
    )
    safeguard: SafeguardConfig = key(
        default_factory=SafeguardConfig,
        doc="A per-site final stage that keeps a site from ending up worse than with a model "
        "trained on its own data alone.",
    )
    tracking: TrackingConfig = key(
        default_factory=TrackingConfig,
        since=2,
        doc="Experiment tracking: TensorBoard or MLflow (execution setting: not part of a run's "
        "identity).",
    )
    algorithm: Mapping[str, Any] = key(
        default_factory=dict,
        doc="Method-specific options (`algorithm.<key>`), checked against the chosen method's "
        "options; e.g. fedoap's `gate` and `ft_prox`.",
    )

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
