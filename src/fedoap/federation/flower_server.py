"""The Flower ServerApp: the one protocol's :class:`~fedoap.federation.server.Server` over
:class:`~fedoap.federation.flower_transport.FlowerTransport` (Flower 1.42 Message API, public API
only).

The Flower app (``flower_app/pyproject.toml``) names this module's ``server_app`` and the
ClientApp of :mod:`fedoap.federation.flower_client`. The server runs the run folder's config
(``run-dir`` in the run config): it waits for every site's node, then runs the rounds, the
fine-tuning stage and the test as steps, one message per site per step
(:mod:`fedoap.federation.flower_records`). Sites keep their own state
(:mod:`fedoap.federation.flower_site`); the server's run folder holds the global arrays, the
server's history and ``summary.json``.

Not supported here, by design: ``centralized`` (pools raw data) and ``feddp`` (its fine-tuning
needs every site's personal query projection, i.e. each client's individual model).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedoap.algorithms import Algorithm, build_algorithm
from fedoap.config import ConfigError
from fedoap.errors import CheckpointError
from fedoap.federation.flower_records import config_from_yaml, str_of
from fedoap.federation.flower_transport import FlowerTransport
from fedoap.federation.server import Server
from fedoap.federation.state import load_run_state
from fedoap.logs import log_to_stream
from fedoap.runs import RunDir
from fedoap.training.device import Timer, resolve_precision

logger = logging.getLogger(__name__)


def unsupported_reason(alg: Algorithm) -> str | None:
    """Why a method cannot run on Flower, or None."""
    if alg.pooled:
        return f"{alg.name} pools the clients' raw training data; it has no federated form"
    if alg.sends_personal_models:
        return (
            f"{alg.name}'s fine-tuning needs every client's personal parameters at the server "
            "(each client's individual model); the Flower runtime never sends personal keys"
        )
    return None


server_app = ServerApp()


def _flag(context: Context, key: str) -> bool:
    return str(context.run_config.get(key, "false")).lower() in ("1", "true", "yes")


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """The run in ``run-dir``, under its lock (a second run or resume of the folder is refused,
    naming the holder), unless ``lock-held``: the ``fedoap run`` that launched this simulation
    holds it for the ServerApp."""
    log_to_stream()  # into Flower's log of the ServerApp, with each record's level
    rd = RunDir(Path(str_of(context.run_config, "run-dir")))
    if _flag(context, "lock-held"):
        _serve(grid, context, rd)
        return
    with rd.lock():
        _serve(grid, context, rd)


def _serve(grid: Grid, context: Context, rd: RunDir) -> None:
    run_dir = rd.root
    resume = _flag(context, "resume")
    # A config written by hand may leave train.precision at auto: the server decides it once,
    # on its device, and every site trains in it (the run's identity holds one precision).
    cfg_yaml = rd.config.read_text()
    cfg = resolve_precision(config_from_yaml(cfg_yaml))
    if cfg.train.precision != config_from_yaml(cfg_yaml).train.precision:
        cfg_yaml = cfg.to_yaml()
    alg = build_algorithm(cfg)
    reason = unsupported_reason(alg)
    if reason:
        raise ConfigError(f"method {cfg.method} cannot run on Flower: {reason}")
    names = [c.name for c in cfg.data.clients]
    base = {"fedoap-config": cfg_yaml, "run-dir": str(run_dir.resolve())}
    pin_keys = _flag(context, "pin-node-keys")
    transport = FlowerTransport(
        grid,
        base,
        names,
        cfg.federation.round_timeout_s,
        pin_keys=pin_keys,
        max_train=cfg.federation.max_train_examples,
    )
    rs = None
    if resume and rd.last.is_file():
        rs = load_run_state(rd, cfg.digest())
        if rs.runtime != "flower":
            raise CheckpointError(f"{rd.last} is not a Flower server's checkpoint")
        # Before the nodes are asked again: the sizes (and keys) the sites joined with hold.
        transport.restore_history(rs.history.get("transport", {}))
    transport.wait_for_all()
    model = alg.build_model()
    server = Server(
        cfg,
        alg,
        transport,
        rd,
        names,
        {n: s["train"] for n, s in transport.sizes.items()},
        model,
        Timer(torch.device("cpu")),
    )
    if rs is not None:
        server.restore(rs)
        logger.info(f"resuming after {rs.stage} step {rs.done}")
    server.run()
    rd.write_json(rd.root / "flower_received_keys.json", transport.received_keys)


__all__ = ["server_app", "unsupported_reason"]
