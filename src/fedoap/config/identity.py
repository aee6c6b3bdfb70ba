"""A run's identity: :func:`config_digest`, the hash of its config without the settings that only
decide where and how fast it runs, and without keys added later while they are at their
default (so runs made before a key existed keep their identity and resume)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from fedoap.config.schema import ClientDPConfig, Config, SafeguardConfig, SampleDPConfig, VolumeSpec


def config_digest(cfg: Config) -> str:
    """Short stable hash of the experiment: the resolved config without its execution
    settings (:data:`EXECUTION_KEYS`), so the same run on a CPU or a GPU has one identity;
    keys added later (:data:`DIGEST_WHEN_SET`) count only when set."""
    plain = cfg.to_dict()
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
