"""The run state and its checkpoint layout. Every command reads and writes run state only
through this module: the in-process runner (checkpoints and ``--resume``), the Flower server and
sites, ``evaluate``, ``predict`` and ``adapt``.

``checkpoints/last.safetensors``, the resume state (one digest-verified file,
:mod:`fedoap.federation.checkpoint`):

* ``global/<key>``: the global arrays the server holds (``shared.*``, ``kv.*``);
* ``server/<key>``: the server's own state (e.g. FedOpt moments);
* ``ft_extra/<key>``: a method's fine-tuning payload;
* ``client/<name>/personal/``, ``extra/``, ``best/``, ``best_kv/``, ``optim/<optimiser>/``: a
  site's personal weights, extra state, selected model, the K/V bank it was selected with, and
  optimiser tensors; under ``client/<name>/local/`` the same for its safeguard's local-only
  model (``safeguard.mode``);
* metadata: ``version``, ``runtime``, ``config_digest``, ``position`` (stage and steps done),
  the metric history, and per client its optimiser scalars, best score and round, and divergence.

A Flower server holds only what a real server holds: ``runtime: flower``, ``global/``,
``server/`` and the history (the metrics the sites reported). Sites keep their personal state in
their own folder, ``checkpoints/site/<name>/step-<k>.safetensors`` (the same tensors as a
``client/<name>/`` block, after step k; the last three steps are kept), so ``--resume`` on a
Flower run continues the server from this file and each site from its own step files, and
``adapt`` gets no client models from the server.

``checkpoints/best/<client>.safetensors``: a client's selected model and K/V bank, what
``evaluate``, ``predict`` and ``adapt`` score.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedoap.basetypes import KV, ClientState
from fedoap.errors import CheckpointError
from fedoap.federation.checkpoint import (
    flatten_optimizer,
    load_tensors,
    peek_meta,
    prefixed,
    save_tensors,
    sub,
    unflatten_optimizer,
)
from fedoap.models import StateDict
from fedoap.runs import RunDir

#: 2: checkpoints carry a digest (fedoap.federation.checkpoint) and excluded clients.
#: 3: one message per round (a round's validation runs in the next step), excluded clients and
#: lost or refused sites in the history, Flower runs keep their history.
CHECKPOINT_VERSION = 3
#: How many of a site's step files are kept (a resumed server repeats at most the last step).
SITE_STEPS_KEPT = 3
STAGES = ("federated", "finetune", "safeguard")


@dataclass
class SiteState:
    """One client's part of the run state."""

    state: ClientState
    best_weights: StateDict = field(default_factory=dict)  # full model state dict
    best_kv: StateDict = field(default_factory=dict)  # kv.* payload at the best round
    best_score: float = -math.inf
    best_round: int = 0
    # safeguard.mode: the site's local-only model, its own track (fedoap.federation.safeguard)
    local: SiteState | None = None


@dataclass
class RunState:
    """Everything a run needs to continue, as the server (and, in-process, the sites) hold it."""

    config_digest: str
    global_arrays: StateDict
    server: StateDict = field(default_factory=dict)
    ft_extra: StateDict = field(default_factory=dict)
    sites: dict[str, SiteState] = field(default_factory=dict)
    stage: str = "federated"
    done: int = 0  # rounds (federated) or epochs (finetune) completed
    # elapsed, rows, round_seconds, bytes_up, bytes_down, phases
    history: dict[str, Any] = field(default_factory=dict)
    runtime: str = "inprocess"


def runtime_of(rd: RunDir) -> str | None:
    """Which runtime wrote the run's resume state ("inprocess", "flower"), from the file's
    header alone; None when there is none."""
    meta = peek_meta(rd.last)
    return str(meta.get("runtime", "inprocess")) if meta else None


def _site_tensors(site: SiteState, p: str) -> tuple[StateDict, dict[str, Any]]:
    """A site's tensors under prefix ``p`` and its metadata."""
    tensors: StateDict = {}
    tensors.update(prefixed(site.state.personal, p + "personal/"))
    tensors.update(prefixed(site.state.extra, p + "extra/"))
    tensors.update(prefixed(site.best_weights, p + "best/"))
    tensors.update(prefixed(site.best_kv, p + "best_kv/"))
    opt_rest = {}
    for opt_name, opt_state in site.state.optimizers.items():
        opt_t, opt_rest[opt_name] = flatten_optimizer(opt_state, f"{p}optim/{opt_name}/")
        tensors.update(opt_t)
    meta: dict[str, Any] = {
        "optimizers": opt_rest,
        "best_score": site.best_score if math.isfinite(site.best_score) else None,
        "best_round": site.best_round,
    }
    if site.local is not None:
        local_t, meta["local"] = _site_tensors(site.local, p + "local/")
        tensors.update(local_t)
    return tensors, meta


def _site_from(tensors: StateDict, cm: Any, p: str, where: str) -> SiteState:
    try:
        return SiteState(
            state=ClientState(
                personal=sub(tensors, p + "personal/"),
                optimizers={
                    k: unflatten_optimizer(tensors, rest, f"{p}optim/{k}/")
                    for k, rest in cm["optimizers"].items()
                },
                extra=sub(tensors, p + "extra/"),
            ),
            best_weights=sub(tensors, p + "best/"),
            best_kv=sub(tensors, p + "best_kv/"),
            best_score=-math.inf if cm["best_score"] is None else cm["best_score"],
            best_round=cm["best_round"],
            local=_site_from(tensors, cm["local"], p + "local/", where) if "local" in cm else None,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{where} is invalid ({err!r})") from None


def save_run_state(rd: RunDir, rs: RunState) -> None:
    tensors: StateDict = {}
    tensors.update(prefixed(rs.global_arrays, "global/"))
    tensors.update(prefixed(rs.server, "server/"))
    tensors.update(prefixed(rs.ft_extra, "ft_extra/"))
    clients_meta: dict[str, Any] = {}
    for name, site in rs.sites.items():
        site_t, clients_meta[name] = _site_tensors(site, f"client/{name}/")
        tensors.update(site_t)
    meta = {
        "version": CHECKPOINT_VERSION,
        "runtime": rs.runtime,
        "config_digest": rs.config_digest,
        "position": {"stage": rs.stage, "done": rs.done},
        **rs.history,
        "clients": clients_meta,
    }
    save_tensors(rd.last, tensors, meta)


_HISTORY: dict[str, type | tuple[type, ...]] = {
    "elapsed": (int, float),
    "rows": list,
    "round_seconds": list,
    "bytes_up": list,
    "bytes_down": list,
}
#: History a run may lack (older runs, or nothing of the kind happened).
_OPTIONAL_HISTORY = (
    "phases",
    "excluded",
    "refused",
    "lost",
    "rejoined",
    "losses",
    "site_seconds",
    "transport",
)


def load_run_state(
    rd: RunDir, config_digest: str | None = None, clients: Iterable[str] = ()
) -> RunState:
    """The run state in ``checkpoints/last.safetensors``, its digest verified
    (:func:`~fedoap.federation.checkpoint.load_tensors`) and its metadata checked: the version,
    the config digest (when given), the position, the history and a state for every one of
    ``clients``. Every error is a :class:`CheckpointError` naming the file."""
    path = rd.last
    tensors, meta = load_tensors(path)
    if meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {meta.get('version')!r}, this fedoap reads "
            f"{CHECKPOINT_VERSION}; finish the run with the fedoap that started it"
        )
    if config_digest is not None and meta.get("config_digest") != config_digest:
        raise CheckpointError(
            f"{path} was written by a different config (digest "
            f"{meta.get('config_digest')} vs {config_digest}); resume with the run's own "
            "config.yaml"
        )
    runtime = str(meta.get("runtime", "inprocess"))
    position = meta.get("position")
    if (
        not isinstance(position, dict)
        or set(position) != {"stage", "done"}
        or position["stage"] not in STAGES
        or not isinstance(position["done"], int)
        or position["done"] < 0
    ):
        raise CheckpointError(f"{path}: checkpoint metadata has an invalid 'position'")
    rs = RunState(
        config_digest=str(meta.get("config_digest")),
        global_arrays=sub(tensors, "global/"),
        server=sub(tensors, "server/"),
        ft_extra=sub(tensors, "ft_extra/"),
        stage=position["stage"],
        done=position["done"],
        runtime=runtime,
    )
    need = {**_HISTORY, "clients": dict}
    for key, kind in need.items():
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{path}: checkpoint metadata lacks a valid {key!r}")
    rs.history = {k: meta[k] for k in _HISTORY}
    for key in _OPTIONAL_HISTORY:
        if key in meta:
            rs.history[key] = meta[key]
    if runtime == "flower":
        return rs  # the server's share: each site resumes from its own folder
    missing = set(clients) - set(meta["clients"])
    if missing:
        raise CheckpointError(f"{path}: no state for client(s) {sorted(missing)}")
    for name, cm in meta["clients"].items():
        rs.sites[name] = _site_from(
            tensors, cm, f"client/{name}/", f"{path}: the state of client '{name}'"
        )
    return rs


def site_state_dir(rd: RunDir, client: str) -> Path:
    """A site's own state folder: one file per step, the last :data:`SITE_STEPS_KEPT` kept."""
    return rd.checkpoints / "site" / client


def _site_steps(rd: RunDir, client: str) -> dict[int, Path]:
    found = {}
    for f in site_state_dir(rd, client).glob("step-*.safetensors"):
        with contextlib.suppress(ValueError):
            found[int(f.name.removeprefix("step-").removesuffix(".safetensors"))] = f
    return found


def save_site_state(
    rd: RunDir, client: str, step: int, site: SiteState, extra: dict[str, Any]
) -> None:
    """A site's state after ``step`` (atomic); older step files beyond the last few go."""
    tensors, meta = _site_tensors(site, "")
    path = site_state_dir(rd, client) / f"step-{step:06d}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"version": CHECKPOINT_VERSION, "client": client, "step": step, **meta, **extra}
    save_tensors(path, tensors, meta)
    for k, f in _site_steps(rd, client).items():
        if k <= step - SITE_STEPS_KEPT or k > step:  # k > step: a step a resumed server redoes
            f.unlink(missing_ok=True)


def load_site_state(
    rd: RunDir, client: str, before: int
) -> tuple[int, SiteState, dict[str, Any]] | None:
    """A site's latest saved state from a step before ``before`` (a resumed server repeats the
    steps after its own checkpoint; a site that was down missed some): (step, state, metadata),
    or None when it has none."""
    steps = sorted(k for k in _site_steps(rd, client) if k < before)
    if not steps:
        return None
    path = _site_steps(rd, client)[steps[-1]]
    tensors, meta = load_tensors(path)
    if meta.get("version") != CHECKPOINT_VERSION or meta.get("client") != client:
        raise CheckpointError(
            f"{path}: not a version-{CHECKPOINT_VERSION} state of site '{client}'"
        )
    return steps[-1], _site_from(tensors, meta, "", str(path)), meta


def save_selected(
    rd: RunDir,
    client: str,
    weights: StateDict,
    kv: StateDict,
    best_round: int,
    method: str,
    config_digest: str,
) -> None:
    """A client's selected model (full state dict) and the K/V bank it was selected with,
    bound to its client and to its run's config (:func:`load_selected` checks both)."""
    meta = {
        "client": client,
        "best_round": best_round,
        "method": method,
        "config_digest": config_digest,
    }
    save_tensors(rd.best(client), {**weights, **kv}, meta)


def selected_info(rd: RunDir, client: str) -> dict[str, Any]:
    """What was saved with a client's selected model: ``best_round`` and ``method``."""
    _, meta = load_tensors(rd.best(client))
    return {k: meta[k] for k in ("best_round", "method") if k in meta}


def load_selected(rd: RunDir, client: str, config_digest: str) -> tuple[StateDict, StateDict]:
    """A client's selected model: (model state dict, its ``kv.*`` arrays).

    The file must say it is ``client``'s model from a run of this config (``config_digest``;
    files written before the digest was recorded are checked for their client only), else a
    :class:`CheckpointError` naming it: a best model copied from another site, another seed or
    another run is refused. The checkpoint's digest proves the file is intact, not where it came
    from: anyone who can write the run folder can also write a consistent forgery."""
    path = rd.best(client)
    tensors, meta = load_tensors(path)
    if meta.get("client") != client:
        raise CheckpointError(
            f"{path}: holds the model of client {meta.get('client')!r}, not of {client!r}"
        )
    recorded = meta.get("config_digest")
    if recorded is not None and recorded != config_digest:
        raise CheckpointError(
            f"{path}: comes from a run of another config (digest {recorded}; this run's "
            f"{rd.config} has {config_digest})"
        )
    weights = {k: v for k, v in tensors.items() if not k.startswith(KV)}
    return weights, {k: v for k, v in tensors.items() if k.startswith(KV)}
