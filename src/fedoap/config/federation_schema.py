"""The config's ``federation`` section (rounds, runtime, aggregation and its defences, a
simulated attack), ``privacy`` (differential privacy at the sites or the server) and
``safeguard`` (a site's fallback to its own model): what the sites share, and how that is
protected. Each key says what it means (``doc``), beside its default and (numeric keys) its
range (:mod:`fedoap.config.keys`, :mod:`fedoap.config.ranges`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedoap.config.keys import key
from fedoap.config.ranges import ranged


@dataclass(frozen=True)
class AttackConfig:
    """A simulated attack, for measuring defences only (``federation.attack``): the named
    clients poison what they send (fedoap.federation.attacks)."""

    clients: tuple[str, ...] = key(
        (), was="sites", doc="The attacking clients, by name (`data.clients[].name`)."
    )
    kind: Literal["nan", "scale", "sign_flip", "noise", "invert_masks"] = key(
        "scale",
        doc="`nan`: NaN uploads. `scale`: the update (upload - global) x 1000. `sign_flip`: the "
        "update negated. `noise`: Gaussian noise with the update's norm, instead of the "
        "update. `invert_masks`: honest training on inverted training masks (data poisoning).",
    )


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = ranged(
        5,
        ge=1,
        le=1_000_000,
        doc="Federated rounds: in each the sampled clients train locally and the server "
        "aggregates what they share.",
    )
    fraction: float = ranged(
        1.0,
        gt=0,
        le=1,
        doc="Share of the clients sampled each round (rounded, at least one), drawn with the "
        "run seed.",
    )
    runtime: Literal["inprocess", "flower-sim"] = key(
        "inprocess",
        doc="`inprocess`: every client in this process. `flower-sim`: the same algorithm "
        "objects through Flower's simulation runtime (needs the `[flower]` extra).",
    )
    checkpoint_every: int = ranged(
        1,
        ge=1,
        doc="Write the resume checkpoint after every k-th round and fine-tuning epoch (always "
        "at the end of each stage). A paper-scale checkpoint (4 clients, w=64) is 2.8 GB, "
        "3-10 s to write on a 2-core CPU; a killed run resumes exactly from the last one "
        "written.",
    )
    round_timeout_s: float = ranged(
        3600.0,
        gt=0,
        doc="Flower: how long the server waits for a step's replies before it counts a silent "
        "site as lost. Unused in-process, where no site can be lost.",
    )
    min_fit_fraction: float = ranged(
        1.0,
        gt=0,
        le=1,
        doc="Flower: the share of the sites sampled to train that must reply for a round to "
        "count (fewer: the run stops, resumable). Unused in-process.",
    )
    aggregator: str = key(
        "mean",
        doc="How the server combines the accepted uploads of the shared parts: a rule "
        "registered in fedoap.aggregation.rules.RULES, the example-weighted mean (`mean`) or "
        "one robust to a minority of bad sites (`median`, `trimmed_mean`, `krum`, "
        "`multi_krum`).",
    )
    trim_beta: float = ranged(
        0.25,
        gt=0,
        lt=0.5,
        doc="`trimmed_mean`: the share of uploads dropped at each end, per coordinate "
        "(floor(beta x n)).",
    )
    num_byzantine: int = ranged(
        1,
        ge=0,
        le=100_000,
        was="byzantine",
        doc="`krum`, `multi_krum`: how many bad clients f to tolerate; needs more than 2 f + 2 "
        "sampled.",
    )
    max_update_norm_ratio: float | None = ranged(
        10.0,
        gt=1,
        doc="An upload whose update norm ||upload - global|| exceeds this many times the "
        "round's median update norm is refused (recorded in summary.json `refused`). null: no "
        "norm check.",
    )
    max_train_examples: int | None = ranged(
        None,
        ge=1,
        le=2**62,
        doc="Flower: a site that declares more training images than this at join is refused. "
        "Each site reports its own count, and the example-weighted mean trusts it: without a "
        "bound, one site declaring 10^9 images would carry the whole average. null: no bound. "
        "In-process the server counts the images itself.",
    )
    validate_updates: bool = key(
        True,
        doc="false: no defence, for measuring what an attack does without one. The server "
        "then checks only what aggregation needs to run at all (keys, shapes, dtypes): "
        "non-finite values, a wrong example count and outlying norms go into the aggregate.",
    )
    attack: AttackConfig = key(
        default_factory=AttackConfig,
        doc="Measurement only: a simulated attack, the named clients poisoning what they send; "
        "none by default.",
    )


@dataclass(frozen=True)
class SampleDPConfig:
    """``privacy.dp``: DP-SGD at every site (Opacus; fedoap.privacy). The unit is an image
    (sample-level) or, with ``unit: case``, a patient or video with all its images."""

    enabled: bool = key(
        False,
        doc="DP-SGD at every site (methods that support it): Poisson sampling, per-unit "
        "gradient clipping, Gaussian noise, and an accountant over every step the site takes, "
        "fine-tuning included. Give exactly one of `epsilon` and `noise_multiplier`.",
    )
    epsilon: float | None = ranged(
        None,
        gt=0,
        doc="Target epsilon: the noise is chosen to spend it over the run's planned steps.",
    )
    noise_multiplier: float | None = ranged(
        None,
        gt=0,
        doc="Noise std as a multiple of `max_grad_norm`; the epsilon it spends is reported "
        "in summary.json.",
    )
    delta: float | None = ranged(
        None,
        gt=0,
        lt=1,
        doc="The accountant's delta. null: 1 / (10 n) for a site with n training units "
        "(stated in summary.json per site).",
    )
    max_grad_norm: float = ranged(
        1.0,
        gt=0,
        doc="Clip norm of each unit's gradient (an image's, or a case's with `unit: case`).",
    )
    accountant: Literal["prv", "rdp"] = key(
        "prv",
        doc="Opacus's privacy accountant: `prv` (privacy random variables) or `rdp` (Rényi DP).",
    )
    unit: Literal["image", "case"] = key(
        "image",
        doc="What one privacy unit is. `image`: each training image (sample-level DP-SGD). "
        "`case`: each case (patient or video) with all its images: cases are Poisson-sampled, "
        "each case's gradient (of its images' mean loss) is clipped, and `train.batch_size` "
        "counts cases.",
    )


@dataclass(frozen=True)
class ClientDPConfig:
    """``privacy.client_dp``: client-level DP (DP-FedAvg; McMahan et al. 2018)."""

    enabled: bool = key(
        False,
        doc="Client-level DP (DP-FedAvg, McMahan et al. 2018): the server clips each site's "
        "update of the shared weights to `clip_norm`, averages them with equal weights and "
        "adds Gaussian noise to the mean; an RDP accountant over the rounds gives the "
        "(epsilon, delta) of a whole site's data. Needs `federation.aggregator: mean` and "
        "`federation.fraction: 1`.",
    )
    clip_norm: float = ranged(
        1.0, gt=0, doc="Clip norm of each site's update of the shared weights."
    )
    noise_multiplier: float = ranged(
        1.0,
        gt=0,
        doc="The noise on the mean update has std noise_multiplier x clip_norm / K, for K sites.",
    )
    delta: float | None = ranged(
        None, gt=0, lt=1, doc="The accountant's delta. null: 1 / (10 K) for K sites."
    )


@dataclass(frozen=True)
class PrivacyConfig:
    dp: SampleDPConfig = key(
        default_factory=SampleDPConfig,
        doc="DP-SGD at every site: a privacy guarantee per image or, with `unit: case`, per "
        "patient or video, against anyone who sees what a site sends or the models it keeps.",
    )
    client_dp: ClientDPConfig = key(
        default_factory=ClientDPConfig,
        doc="Client-level DP at the server (DP-FedAvg): a guarantee for a whole site's data in "
        "what the global model reveals, with a trusted server.",
    )


@dataclass(frozen=True)
class SafeguardConfig:
    """A per-site final stage that keeps a site from ending up worse than alone
    (fedoap.federation.safeguard)."""

    mode: Literal["none", "choose", "interpolate"] = key(
        "none",
        doc="`none`: off. Otherwise each site also trains a local-only model (the method's "
        "network on its own data, with `local`'s protocol and budget; it never leaves the "
        "site) and keeps, by its validation score, `choose`: the personalised federated model "
        "or the local one; `interpolate`: the best point alpha x local + (1 - alpha) x "
        "federated of `alphas`.",
    )
    alphas: tuple[float, ...] = ranged(
        (0.0, 0.25, 0.5, 0.75, 1.0),
        ge=0,
        le=1,
        doc="`interpolate`: the grid of alpha; it holds 0 (the federated model) and 1 (the "
        "local one).",
    )
