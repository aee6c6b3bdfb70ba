"""A run's identity: :func:`config_digest`, a short hash of its config.

Runs are matched by it: a resume checks it, a benchmark caches its cells under it, committed
results and checkpoints carry it. So it leaves out what cannot change a result, and it must not
change when the schema grows or a key is renamed. Digests are versioned for that:

* **What is hashed** (:func:`digest_view`) is the resolved config without the settings that
  only decide where and how fast a run executes (:data:`EXECUTION_KEYS`), so one experiment on
  a CPU or a GPU has one identity.
* **Version 1** is the schema when versions were introduced (:data:`V1_KEYS`), hashed as it
  always was: the keys added to it after runs already existed, which change a result only when
  set, are left out while at their default (:data:`V1_WHEN_SET`, and the sections of
  :data:`V1_SECTIONS_WHEN_SET` when left empty). These three are frozen: they are never
  extended.
* **A key added since** declares, on its schema field, the version that introduced it
  (``ranged(..., since=2)``, or ``key(default, since=2)``; :mod:`fedoap.config.keys`). While
  at its default it is left out, so the digest of every run made before it existed stays the
  same; set, it counts. That declaration is all there is to do when adding a key:
  :func:`undeclared_keys` lists any key that version 1 did not have and that declares no
  version, which would otherwise enter, and change, every digest (tests/test_config_history.py
  fails on one).
* **A renamed key** keeps its earlier name on its field (``was="byzantine"``) and is hashed
  under the name it was introduced with, so a rename changes no digest either.

:data:`DIGEST_VERSION` is what a key added now declares. It only needs raising if the way keys
are hashed ever changes; a key's ``since`` then says which way hashes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedoap.config.keys import default_of, first_name, schema_keys, since_of

if TYPE_CHECKING:
    from fedoap.config.schema import Config

#: The version of the digest that a key added to the schema now declares (``since``).
DIGEST_VERSION = 2


def config_digest(cfg: Config) -> str:
    """Short stable hash of the experiment: :func:`digest_view` of the config, so the same
    run on a CPU or a GPU has one identity, and keys added later count only when set."""
    blob = json.dumps(digest_view(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def digest_view(cfg: Config) -> dict[str, Any]:
    """What :func:`config_digest` hashes: the config in plain form as version 1 saw it (keys
    introduced after version 1 left out at their default, each key under the name it was
    introduced with), without its execution settings (:data:`EXECUTION_KEYS`) and without
    version 1's keys and sections left at their default."""
    plain: dict[str, Any] = _as_v1(cfg)
    for dotted in EXECUTION_KEYS:
        section, name = dotted.split(".")
        if section in plain:  # a later section is absent while at its default
            plain[section].pop(name, None)
            if not plain[section]:  # only execution settings were set (tracking)
                plain.pop(section)
    _drop_v1_when_set(plain)
    for section in V1_SECTIONS_WHEN_SET:  # a later section left empty: as if absent
        if not plain.get(section):
            plain.pop(section, None)
    return plain


def _as_v1(value: Any) -> Any:
    """A config value in plain form (tuples as lists) as version 1 saw it: the keys introduced
    after version 1 left out while at their default, every key under its first name."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            plain = _as_v1(getattr(value, f.name))
            if since_of(f) > 1 and plain == _as_v1(default_of(f)):
                continue
            out[first_name(f)] = plain
        return out
    if isinstance(value, Mapping):
        return {str(k): _as_v1(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_v1(v) for v in value]
    return value


def _drop_v1_when_set(plain: dict[str, Any]) -> None:
    """Version 1's rule: each key of :data:`V1_WHEN_SET` is left out at its default."""
    for dotted, default in V1_WHEN_SET.items():
        section, rest = dotted.split(".", 1)
        if rest.startswith("clients[]."):  # a key of every client spec
            name = rest.removeprefix("clients[].")
            for client in plain[section]["clients"]:
                if client.get(name) == default:
                    client.pop(name, None)
            continue
        *parents, last = rest.split(".")  # a key of a nested section, e.g. privacy.dp.unit
        where = plain[section]
        for part in parents:
            where = where.get(part) if isinstance(where, dict) else None
        if isinstance(where, dict) and where.get(last) == default:
            where.pop(last, None)


def undeclared_keys(cls: type) -> list[str]:
    """The keys of config class ``cls`` that :data:`V1_KEYS` does not hold and that declare no
    version (``since``), or declare one without a default: each would change every digest."""
    bad = []
    for name, first, f in schema_keys(cls):
        if since_of(f) == 1 and first not in V1_KEYS:
            bad.append(f"{name}: added after version 1 without since={DIGEST_VERSION}")
        elif since_of(f) > 1 and default_of(f) is dataclasses.MISSING:
            bad.append(f"{name}: added after version 1 without a default")
        elif since_of(f) > DIGEST_VERSION:
            bad.append(f"{name}: since={since_of(f)} is past DIGEST_VERSION={DIGEST_VERSION}")
    return bad


def _dotted(sections: dict[str, str]) -> frozenset[str]:
    return frozenset(
        f"{section}.{name}" if section else name
        for section, names in sections.items()
        for name in names.split()
    )


#: Version 1, frozen: every key of the schema in version 1, by the name it had then (a list of
#: sections as ``data.clients[]``). A key not here declares the version that introduced it.
V1_KEYS = _dotted(
    {
        "": "method seed data model train federation finetune privacy safeguard algorithm",
        "data": "root clients image_size channels normalize split max_train_images "
        "max_train_cases max_val_images max_test_images augment cache cache_dir "
        "max_image_pixels max_volume_voxels",
        "data.clients[]": "name source path use_rgb where image_dir mask_dir mask_suffix "
        "case_regex channel volume style num_images seed",
        "data.clients[].volume": "labels axis intensity window percentiles slices "
        "empty_fraction seed",
        "data.split": "train val test seed follow_run_seed",
        "data.augment": "enabled flip rotate_deg intensity",
        "model": "width depth heads norm use_dca use_adapter kv",
        "model.kv": "mode summary bank_size summary_images kmeans_iters",
        "train": "lr weight_decay batch_size local_epochs precision select_metric num_threads "
        "device compile compile_mode channels_last tf32 deterministic on_divergence "
        "eval_batch_size",
        "federation": "rounds fraction runtime checkpoint_every round_timeout_s "
        "min_fit_fraction aggregator trim_beta byzantine max_update_norm_ratio "
        "max_train_examples validate_updates attack",
        "federation.attack": "sites kind",
        "finetune": "epochs lr parts patience pbl",
        "finetune.pbl": "enabled region tau s lam band_width",
        "privacy": "dp client_dp",
        "privacy.dp": "enabled epsilon noise_multiplier delta max_grad_norm accountant unit",
        "privacy.client_dp": "enabled clip_norm noise_multiplier delta",
        "safeguard": "mode alphas",
    }
)

#: Version 1, frozen: keys that joined the schema after runs already existed and change a
#: result only when set, with their default in plain form (tuples as lists), by the name they
#: had then. Left out of the digest at that default, so earlier runs kept their identity.
V1_WHEN_SET: dict[str, Any] = {
    "train.on_divergence": "stop",
    "data.clients[].where": {},
    "data.clients[].volume": {
        "labels": [],
        "axis": None,
        "intensity": "auto",
        "window": None,
        "percentiles": [0.5, 99.5],
        "slices": "all",
        "empty_fraction": 0.0,
        "seed": 0,
    },
    "federation.aggregator": "mean",
    "federation.trim_beta": 0.25,
    "federation.byzantine": 1,
    "federation.max_update_norm_ratio": 10.0,
    "federation.validate_updates": True,
    "federation.max_train_examples": None,
    "federation.attack": {"sites": [], "kind": "scale"},
    "privacy.dp": {
        "enabled": False,
        "epsilon": None,
        "noise_multiplier": None,
        "delta": None,
        "max_grad_norm": 1.0,
        "accountant": "prv",
        "unit": "image",
    },
    "privacy.client_dp": {
        "enabled": False,
        "clip_norm": 1.0,
        "noise_multiplier": 1.0,
        "delta": None,
    },
    # After privacy.dp: a default privacy.dp (unit included) is dropped whole first.
    "privacy.dp.unit": "image",
    "data.max_train_cases": None,
    "finetune.patience": None,
    "data.split.follow_run_seed": False,
    "safeguard.mode": "none",
    "safeguard.alphas": [0.0, 0.25, 0.5, 0.75, 1.0],
}

#: Version 1, frozen: sections that joined after runs already existed, dropped from the digest
#: when every key of them is at its default (:data:`V1_WHEN_SET`).
V1_SECTIONS_WHEN_SET = ("privacy", "safeguard")

#: Settings that decide where and how fast a run executes, not what it computes (up to float
#: rounding): left out of :meth:`Config.digest`, by the name the digest knows them by.
#: ``train.num_threads`` predates this list and stays in the digest; benchmark cells zero it
#: (fedoap.bench.digest). An execution setting added later is listed here and declares its
#: version too.
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
    "tracking.backend",
    "tracking.uri",
    "tracking.experiment",
)
