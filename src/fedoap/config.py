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
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type. The message names the key."""


CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]

#: Accepted spellings of ``train.device`` (whether the device exists is checked at run time).
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSpec:
    """One client (hospital) and where its data comes from.

    ``source`` is ``npz`` (the format of ``../shared/data``), ``folder`` (image/mask pairs matched
    by file stem) or ``synthetic`` (the built-in generator, see :mod:`fedoap.data.synthetic`).
    """

    name: str
    source: Literal["npz", "folder", "synthetic"] = "npz"
    # File or folder, relative to ``data.root`` unless absolute. Unused for ``synthetic``.
    path: str | None = None
    # npz: use the ``images_rgb`` array instead of ``images`` (needs ``data.channels=3``).
    use_rgb: bool = False
    # folder: sub-folders holding the pairs, and the suffix that turns an image stem into its
    # mask stem (``case_1.png`` <-> ``case_1_mask.png``). Pairs are matched by name, never order.
    image_dir: str = "images"
    mask_dir: str = "masks"
    mask_suffix: str = ""
    # folder: a regular expression whose first group, applied to the image stem, is the case
    # (patient) id. Without it every image is its own case.
    case_regex: str | None = None
    # folder: for multi-channel images, which channel to read (None: convert to grayscale).
    channel: int | None = None
    # synthetic: the "organ/modality" style and number of images (see fedoap.data.synthetic).
    style: str | None = None
    num_images: int = 240
    seed: int = 0


@dataclass(frozen=True)
class SplitConfig:
    """Patient-level train/val/test fractions. Cases (``case_ids``) never straddle splits."""

    train: float = 0.7
    val: float = 0.15
    test: float = 0.15
    # Fixed separately from the run seed, so every method and seed sees the same split.
    seed: int = 0


@dataclass(frozen=True)
class AugmentConfig:
    """Online augmentation of training batches (never applied to val/test)."""

    enabled: bool = False
    flip: bool = True
    rotate_deg: float = 10.0  # uniform in [-rotate_deg, rotate_deg]
    intensity: float = 0.1  # scale ~ U[1-i, 1+i], shift ~ U[-i, i] on normalised intensities


@dataclass(frozen=True)
class DataConfig:
    # Folder that relative client paths are resolved against. Users point it at their own data.
    root: str = "../shared/data"
    clients: tuple[ClientSpec, ...] = ()
    image_size: int = 128
    channels: int = 1
    # Per-image z-score suits MRI, ultrasound and endoscopy alike (no calibrated intensities).
    normalize: Literal["zscore", "unit"] = "zscore"
    split: SplitConfig = field(default_factory=SplitConfig)
    # Caps keep CPU runs short. Caps subsample within a split, so splits stay patient-level.
    max_train_images: int | None = None
    max_val_images: int | None = None
    max_test_images: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Preprocessed cache: each client's images letterboxed to image_size once and stored on disk,
    # keyed by the source files and these settings (fedoap.data.cache). An execution setting:
    # it never changes a result, so it is not part of a run's identity (Config.digest).
    cache: bool = True
    # None: $FEDOAP_CACHE_DIR, else ~/.cache/fedoap.
    cache_dir: str | None = None


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
    bank_size: int = 16
    # Images used to compute the summary (bounded cost; a statistic over many images).
    summary_images: int = 256
    kmeans_iters: int = 10


@dataclass(frozen=True)
class ModelConfig:
    width: int = 16  # w: encoder widths w, 2w, 4w, 8w; bottleneck 16w. The paper uses 64.
    # Encoder levels (widths w..w*2^(depth-1)); the bottleneck pools once more to w*2^depth
    # channels, so the attention sees (size/2^depth)^2 tokens: 8x8 = 64 at 128^2 with depth 4.
    depth: int = 4
    heads: int = 4
    norm: Literal["instance", "batch", "group"] = "instance"
    use_dca: bool = True
    use_adapter: bool = True
    kv: KVConfig = field(default_factory=KVConfig)


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 16
    local_epochs: int = 1
    # Autocast dtype for convolutions and matmuls; weights, optimiser state, losses and uploads
    # stay fp32. bf16: CPUs and CUDA GPUs that support it (1.4-2x faster than fp32 on our CPUs;
    # see README for the Dice check). fp16: autocast with a GradScaler (GPUs without bf16).
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    # Validation metric used to select each client's model.
    select_metric: Literal["dice", "case_dice"] = "dice"
    # 0: use every core torch sees.
    num_threads: int = 0
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
    # Images per forward pass in validation and test (no gradients, so large batches fit).
    eval_batch_size: int = 256


@dataclass(frozen=True)
class PBLConfig:
    """Perturbed boundary loss (method.md, "Perturbed boundary loss")."""

    enabled: bool = True
    region: Literal["error", "band", "error_and_band"] = "error"
    tau: float = 0.75  # error threshold on |sigma(z) - y|
    s: float = 0.1  # perturbation scale
    lam: float = 0.1  # weight of the perturbed term
    band_width: int = 2  # b, pixels either side of a boundary for region=band


@dataclass(frozen=True)
class FinetuneConfig:
    """Local personalisation stage after the federated rounds (only for methods that have one)."""

    epochs: int = 2
    lr: float | None = None  # None: train.lr
    parts: Literal["all", "personal"] = "all"
    pbl: PBLConfig = field(default_factory=PBLConfig)


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = 5
    fraction: float = 1.0  # share of clients sampled each round (at least one)
    # inprocess: every client in this process (default). flower-sim: the same algorithm objects
    # through Flower's simulation runtime (needs the [flower] extra).
    runtime: Literal["inprocess", "flower-sim"] = "inprocess"
    # Write the resume checkpoint after every k-th round and fine-tuning epoch (always at the end
    # of each stage). A paper-scale checkpoint (4 clients, w=64) is 2.8 GB, 8-10 s to write on
    # our CPU machine; a killed run resumes exactly from the last one written. An execution
    # setting (not part of Config.digest).
    checkpoint_every: int = 1


@dataclass(frozen=True)
class Config:
    method: str = "fedoap"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # Method-specific options, validated against the chosen method's ``Options`` dataclass.
    algorithm: Mapping[str, Any] = field(default_factory=dict)

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
        blob = json.dumps(plain, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


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
    "federation.checkpoint_every",
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
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")  # pragma: no cover


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys under "
            f"'{prefix.rstrip('.') or '<root>'}' are: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {err}") from err
    # YAML reads 3e-4 as a string (it wants 3.0e-4); be forgiving for numbers.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value) if any(c in value for c in ".eE") else int(value)
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply dotted overrides to a nested plain dict (in a copy)."""
    out = json.loads(json.dumps(data))
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


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
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
    """Cross-field checks that types alone cannot express."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    d = cfg.data
    need(len(d.clients) >= 1, "data.clients: at least one client is needed")
    names = [c.name for c in d.clients]
    need(len(set(names)) == len(names), f"data.clients: duplicate client names in {names}")
    for i, c in enumerate(d.clients):
        need(
            bool(c.name) and "/" not in c.name,
            f"data.clients[{i}].name: {c.name!r} is not a usable name",
        )
        if c.source == "synthetic":
            need(c.style is not None, f"data.clients[{i}].style: required for a synthetic client")
            need(c.num_images >= 6, f"data.clients[{i}].num_images: at least 6 images are needed")
        else:
            need(c.path is not None, f"data.clients[{i}].path: required for source={c.source}")
        need(
            not (c.use_rgb and d.channels != 3), f"data.clients[{i}].use_rgb needs data.channels=3"
        )
    need(d.channels in (1, 3), f"data.channels: must be 1 or 3, got {d.channels}")
    s = d.split
    need(min(s.train, s.val, s.test) > 0, "data.split: train, val and test must all be > 0")
    need(abs(s.train + s.val + s.test - 1.0) < 1e-6, "data.split: train + val + test must sum to 1")
    for key in ("max_train_images", "max_val_images", "max_test_images"):
        v = getattr(d, key)
        need(v is None or v > 0, f"data.{key}: must be positive or null, got {v}")
    m = cfg.model
    need(m.width >= 2, f"model.width: must be >= 2, got {m.width}")
    need(1 <= m.depth <= 6, f"model.depth: must be in 1..6, got {m.depth}")
    need(
        d.image_size % (2**m.depth) == 0,
        f"data.image_size={d.image_size} must be divisible by 2^model.depth={2**m.depth}",
    )
    c_bottleneck = m.width * 2**m.depth
    need(
        m.heads >= 1 and c_bottleneck % m.heads == 0,
        f"model.heads={m.heads} must divide the bottleneck width "
        f"model.width*2^model.depth={c_bottleneck}",
    )
    need(m.kv.bank_size >= 1, "model.kv.bank_size: must be >= 1")
    need(m.kv.summary_images >= 1, "model.kv.summary_images: must be >= 1")
    t = cfg.train
    need(t.lr > 0, "train.lr: must be > 0")
    need(t.batch_size >= 1, "train.batch_size: must be >= 1")
    need(t.local_epochs >= 1, "train.local_epochs: must be >= 1")
    need(t.num_threads >= 0, "train.num_threads: must be >= 0")
    need(t.eval_batch_size >= 1, "train.eval_batch_size: must be >= 1")
    need(
        bool(DEVICE_PATTERN.fullmatch(t.device)),
        f"train.device: must be auto, cpu, cuda, cuda:N or mps, got {t.device!r}",
    )
    f = cfg.federation
    need(f.rounds >= 1, "federation.rounds: must be >= 1")
    need(0 < f.fraction <= 1, "federation.fraction: must be in (0, 1]")
    need(f.checkpoint_every >= 1, "federation.checkpoint_every: must be >= 1")
    ft = cfg.finetune
    need(ft.epochs >= 0, "finetune.epochs: must be >= 0")
    need(0 <= ft.pbl.lam <= 1, "finetune.pbl.lam: must be in [0, 1]")
    need(0 <= ft.pbl.tau <= 1, "finetune.pbl.tau: must be in [0, 1]")
    need(ft.pbl.s >= 0, "finetune.pbl.s: must be >= 0")
    need(ft.pbl.band_width >= 1, "finetune.pbl.band_width: must be >= 1")


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(cfg.to_yaml())
