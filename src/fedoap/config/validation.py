"""The checks a config passes before anything runs: every key's range, then the cross-field
rules that ranges cannot express. Errors name the dotted key."""

from __future__ import annotations

import re
from collections.abc import Callable

from fedoap.config.data_schema import VOLUME_SOURCES, ClientSpec, VolumeSpec
from fedoap.config.federation_schema import FederationConfig, PrivacyConfig, SafeguardConfig
from fedoap.config.ranges import _short, check_ranges
from fedoap.config.schema import Config
from fedoap.errors import ConfigError
from fedoap.fileio import SAFE_NAME, SAFE_NAME_RULE

#: Accepted spellings of ``train.device`` (whether the device exists is checked at run time).
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


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
    _validate_tracking(cfg, need)
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
        krum or f.num_byzantine == defaults.num_byzantine,
        f"federation.num_byzantine: only used by federation.aggregator=krum or multi_krum, not "
        f"{f.aggregator}",
    )
    need(
        f.validate_updates or f.max_update_norm_ratio == defaults.max_update_norm_ratio,
        "federation.max_update_norm_ratio: not used with federation.validate_updates=false (no "
        "update is checked)",
    )
    names = [c.name for c in cfg.data.clients]
    for i, name in enumerate(f.attack.clients):
        need(
            name in names,
            f"federation.attack.clients[{i}]: {name!r} is not a client; clients: "
            f"{', '.join(names)}",
        )
    need(
        bool(f.attack.clients) or f.attack.kind == defaults.attack.kind,
        "federation.attack.kind: no federation.attack.clients attack",
    )
    if krum:
        n = len(cfg.data.clients)
        sampled = max(1, round(f.fraction * n))
        need(
            sampled > 2 * f.num_byzantine + 2,
            f"federation.num_byzantine={f.num_byzantine}: {f.aggregator} needs more than 2 f + 2 "
            f"= {2 * f.num_byzantine + 2} sites per round (f < n/2 - 1), and {sampled} are "
            f"sampled of {n}; lower f, or use median or trimmed_mean",
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


def _validate_tracking(cfg: Config, need: Callable[[bool, str], None]) -> None:
    """Tracking options only with a backend, and a name an experiment can have."""
    tr = cfg.tracking
    if tr.backend == "none":
        need(tr.uri is None, "tracking.uri: only used with tracking.backend mlflow or tensorboard")
        need(
            tr.experiment is None,
            "tracking.experiment: only used with tracking.backend=mlflow",
        )
    if tr.backend == "tensorboard":
        need(tr.experiment is None, "tracking.experiment: only used with tracking.backend=mlflow")
    for k in ("uri", "experiment"):
        v = getattr(tr, k)
        need(v is None or v.strip() != "", f"tracking.{k}: empty; leave it out for the default")
