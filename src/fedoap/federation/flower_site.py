"""A site on Flower: what a node does for the query and for each step, over the one protocol
of :mod:`fedoap.federation.site`.

The handlers run in the ClientApp's own process (simulation, or ``worker=false`` in a
SuperNode's node config) or in the site's long-lived worker
(:mod:`fedoap.federation.flower_worker`), and compute the same either way. Which configured
site a node is comes from its node config (``client-name``, or ``partition-id`` in
simulation); the resolved fedoap config travels from the server in every message, so a site
needs only its own data path (``--node-config "client-name=... data-path=..."``).

A site may track its own metrics to its own store, which may have to stay at the site:
``tracking-backend`` (``mlflow`` or ``tensorboard``), and optionally ``tracking-uri`` and
``tracking-experiment``, in its node config (the ``tracking`` keys of the config, for this site
alone; the run config's ``tracking`` is the server's).

Personal parameters, optimiser state and the selected model stay in the site's folder
(``<output-dir>/checkpoints/site/<name>/``, ``checkpoints/best/<name>.safetensors``) and never
enter a message: a step loads the site's state from its folder
(:func:`~fedoap.federation.state.load_site_state`), runs, and saves it back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from flwr.app import ArrayRecord, Context, Message

from fedoap.algorithms import build_algorithm
from fedoap.basetypes import Update
from fedoap.config import VOLUME_SOURCES, ConfigError, TrackingConfig
from fedoap.data.dataset import make_client
from fedoap.federation.flower_records import (
    claim,
    claim_reply,
    config_from_yaml,
    int_of,
    received_arrays,
    received_config,
    reply,
    step_records,
    str_of,
)
from fedoap.federation.site import Site, Step
from fedoap.federation.state import SiteState, load_site_state, save_selected, save_site_state
from fedoap.models import FedOAPNet, StateDict
from fedoap.runs import RunDir
from fedoap.tracking import check_tracking, open_tracker
from fedoap.training.device import Timer, describe, place, session, setup

logger = logging.getLogger(__name__)


@dataclass
class _Built:
    """What a node builds once per process and reuses across messages (Flower's simulation
    keeps its workers; a deployment starts a process per message)."""

    site: Site
    out: RunDir  # the site's folder
    index: int
    tracking: TrackingConfig  # the site's own, from its node config


_SITES: dict[tuple[str, str, str, str, str], _Built] = {}


def _build(nc: Mapping[str, Any], cfg_yaml: str, run_dir: str) -> tuple[_Built, float]:
    """Resolve which site this node is (``nc``: its node config) and load its data (cached per
    process); returns it and the seconds spent building it now."""
    t0 = time.perf_counter()
    cfg = config_from_yaml(cfg_yaml)
    names = [c.name for c in cfg.data.clients]
    if "client-name" in nc:
        name = str_of(nc, "client-name")
        if name not in names:
            raise ConfigError(f"node-config client-name={name!r} is not one of {names}")
    elif "partition-id" in nc:  # simulation: virtual node i is client i
        name = names[int_of(nc, "partition-id")]
    else:
        raise ConfigError("node-config needs client-name (deployment) or partition-id (simulation)")
    if "device" in nc:  # the site's own choice; otherwise train.device ("auto": CUDA if present)
        device_spec = str_of(nc, "device")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device_spec))
    out = str(nc.get("output-dir", run_dir))
    key = (cfg.digest(), name, str(nc.get("data-path", "")), str(cfg.train.device), out)
    if key in _SITES:
        return _SITES[key], 0.0
    spec = next(c for c in cfg.data.clients if c.name == name)
    if "data-path" in nc:  # the site's own copy of its data
        path = str_of(nc, "data-path")
        # A volume dataset stays one (with its channel, labels and slicing); otherwise a folder
        # holds image/mask pairs and a file is an npz.
        source = spec.source
        if source not in VOLUME_SOURCES:
            source = "folder" if Path(path).is_dir() else "npz"
        spec = dataclasses.replace(spec, path=path, source=source)
    device = setup(cfg.train)
    if cfg.train.compile:
        # Flower 1.42 starts a ClientApp process per message, and compiling is per process.
        warnings.warn(
            "train.compile on Flower: each ClientApp process compiles its model, and Flower "
            "starts one per message (the inductor cache on disk shortens all but the first)",
            stacklevel=2,
        )
    alg = build_algorithm(cfg)
    model = cast(
        FedOAPNet,
        place(alg.build_model(), cfg.train, device, per_example_grads=cfg.privacy.dp.enabled),
    )
    data = make_client(spec, cfg.data).to(device)  # from the preprocessed cache
    rd = RunDir(Path(out))
    record = SiteState(alg.init_client(model))

    def selected(site: Site) -> None:
        assert site.final is not None
        weights, kv = site.final
        save_selected(rd, site.name, weights, kv, site.record.best_round, alg.name, cfg.digest())

    site = Site(cfg, alg, model, data, record, Timer(device), on_selected=selected)
    _SITES[key] = _Built(site, rd, names.index(name), site_tracking(nc))
    return _SITES[key], time.perf_counter() - t0


def site_tracking(nc: Mapping[str, Any]) -> TrackingConfig:
    """The site's own tracking, from its node config (``tracking-backend``, ``tracking-uri``,
    ``tracking-experiment``); none unless it asks."""
    backend = str(nc.get("tracking-backend", "none"))
    if backend not in ("none", "mlflow", "tensorboard"):
        raise ConfigError(
            f"node-config tracking-backend={backend!r}: must be none, mlflow or tensorboard"
        )
    uri = str_of(nc, "tracking-uri") if "tracking-uri" in nc else None
    experiment = str_of(nc, "tracking-experiment") if "tracking-experiment" in nc else None
    tracking = TrackingConfig(backend=backend, uri=uri, experiment=experiment)  # type: ignore[arg-type]
    check_tracking(tracking)
    return tracking


def track_site(
    built: _Built, folder: Path, rows: list[dict[str, Any]], test: dict[str, Any] | None
) -> None:
    """The site's rows so far, and at the test its scores, to the site's own store."""
    site = built.site
    cfg = dataclasses.replace(site.cfg, tracking=built.tracking)
    tracker = open_tracker(cfg, folder, name=site.name)
    tracker.log_rows(rows)
    if test is not None:
        summary = {"clients": {site.name: test}, "execution": describe(site.timer.device)}
        tracker.finish(summary)


def identify(nc: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, int]:
    """Which configured site this node is, and its split sizes (the query message)."""
    built, _ = _build(nc, str(config["fedoap-config"]), str(config["run-dir"]))
    return claim(built.index, built.site.data.sizes())


def run_step(
    nc: Mapping[str, Any], config: Mapping[str, Any], global_arrays: StateDict, startup: float
) -> tuple[dict[str, Any], Update | None]:
    """One step at this site: its state from its folder, the step, its state back to its folder.
    Returns the reply's result (validation rows, test entry, seconds per phase, the step its
    state came from) and its upload, if it trained."""
    built, build_s = _build(nc, str(config["fedoap-config"]), str(config["run-dir"]))
    site, rd = built.site, built.out
    step = Step(**json.loads(str(config["step"])))
    t0 = time.perf_counter()
    found = load_site_state(rd, site.name, before=step.round)
    rows: list[dict[str, Any]] = []
    resumed_from = 0
    if found is None:
        site.record = SiteState(site.alg.init_client(site.model))
    else:
        resumed_from, site.record, meta = found
        rows = list(meta.get("rows", []))
    note = None
    if step.round > 1 and resumed_from < step.round - 1:
        note = (
            f"site '{site.name}' rejoins at step {step.round} from its state after step "
            f"{resumed_from}"
        )
    load_s = time.perf_counter() - t0
    with session(site.cfg.train, next(site.model.parameters()).device):
        answer = site.handle(step, global_arrays, {})
    if answer.diverged is not None:
        raise answer.diverged
    t0 = time.perf_counter()
    rows += answer.rows
    save_site_state(rd, site.name, step.round, site.record, {"rows": rows})
    own = RunDir(rd.root / "sites" / site.name)  # the site's own record of its run
    tracked = built.tracking.backend != "none"
    if answer.test is not None or tracked:
        own.root.mkdir(parents=True, exist_ok=True)
        own.write_metrics(rows)
    if tracked:
        track_site(built, own.root, rows, answer.test)
    if answer.test is not None:
        own.write_json(own.root / "test.json", answer.test)
    seconds = {
        "startup": startup,
        "data": build_s,
        "state": load_s + time.perf_counter() - t0,
        **answer.seconds,
    }
    result = {
        "rows": answer.rows,
        "test": answer.test,
        "seconds": seconds,
        "resumed_from": resumed_from,
        "note": note,
    }
    return result, answer.update


def query_handler(msg: Message, context: Context) -> Message:
    """The query message, in this process."""
    return claim_reply(msg, identify(context.node_config, received_config(msg)))


def train_handler(msg: Message, context: Context, startup: float) -> Message:
    """A step message, in this process (simulation, or ``worker=false``); ``startup``: the
    seconds this process took to start, charged to its first step."""
    result, update = run_step(
        context.node_config, received_config(msg), received_arrays(msg), startup
    )
    if result["note"]:
        logger.info(result["note"])  # into the SuperNode's log
    if update is None:
        return reply(msg, step_records(json.dumps(result), None, 0, 0.0))
    records = step_records(
        json.dumps(result),
        ArrayRecord(update.arrays),
        update.num_examples,
        float(update.metrics["train_loss"]),
    )
    return reply(msg, records)
