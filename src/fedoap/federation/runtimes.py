"""The runtimes a run can execute on (``federation.runtime``): what each checks before any work,
how it runs a prepared run folder, and how it resumes one. The commands and the Python API ask
this table; they never branch on the runtime themselves.

* ``inprocess``: every site in this process (:class:`~fedoap.federation.runner.Runner`);
* ``flower-sim``: the same protocol through Flower's simulation engine, which writes the same
  run folder (needs the ``[flower]`` extra).

A run made on a Flower deployment is resumed on that deployment, not here.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Protocol

from fedoap.algorithms import Algorithm
from fedoap.config import Config, ConfigError
from fedoap.data.dataset import ClientData, prepare_clients
from fedoap.federation.runner import Runner
from fedoap.runs import RunDir

logger = logging.getLogger(__name__)


class Runtime(Protocol):
    def check(self, cfg: Config, alg: Algorithm) -> None:
        """Refuse, with a :class:`ConfigError`, a run this runtime cannot execute."""
        ...

    def run(
        self,
        cfg: Config,
        alg: Algorithm,
        clients: list[ClientData],
        rd: RunDir,
        progress: bool,
        data_seconds: float,
    ) -> dict[str, Any]:
        """Execute a new run in the prepared folder ``rd``; returns ``summary.json``."""
        ...

    def resume(self, cfg: Config, alg: Algorithm, rd: RunDir, progress: bool) -> dict[str, Any]:
        """Continue a killed run from its checkpoint (or from round 1 without one)."""
        ...


class InProcessRuntime:
    def check(self, cfg: Config, alg: Algorithm) -> None:
        pass

    def run(
        self,
        cfg: Config,
        alg: Algorithm,
        clients: list[ClientData],
        rd: RunDir,
        progress: bool,
        data_seconds: float,
    ) -> dict[str, Any]:
        runner = Runner(cfg, alg, clients, rd, progress=progress, data_seconds=data_seconds)
        return runner.run()

    def resume(self, cfg: Config, alg: Algorithm, rd: RunDir, progress: bool) -> dict[str, Any]:
        t0 = time.perf_counter()
        clients = prepare_clients(cfg.data)
        data_seconds = time.perf_counter() - t0
        runner = Runner(cfg, alg, clients, rd, progress=progress, data_seconds=data_seconds)
        if rd.last.is_file():
            runner.restore()
            stage, done = runner.position
            logger.info(f"resuming {rd.root} after {stage} step {done}")
        else:
            logger.info(f"no checkpoint in {rd.checkpoints}; starting {rd.root} from round 1")
        return runner.run()


class FlowerSimulationRuntime:
    def check(self, cfg: Config, alg: Algorithm) -> None:
        try:
            from fedoap.federation.flower_server import unsupported_reason
        except ImportError as err:
            raise ConfigError(
                f"federation.runtime=flower-sim needs Flower: pip install -e '.[flower]' ({err})"
            ) from None
        reason = unsupported_reason(alg)
        if reason:
            raise ConfigError(f"method {cfg.method} cannot run on Flower: {reason}")

    def run(
        self,
        cfg: Config,
        alg: Algorithm,
        clients: list[ClientData],
        rd: RunDir,
        progress: bool,
        data_seconds: float,
    ) -> dict[str, Any]:
        return self._simulate(cfg, rd, resume=False)

    def resume(self, cfg: Config, alg: Algorithm, rd: RunDir, progress: bool) -> dict[str, Any]:
        logger.info(f"resuming the Flower simulation in {rd.root} from its server checkpoint")
        return self._simulate(cfg, rd, resume=True)

    def _simulate(self, cfg: Config, rd: RunDir, resume: bool) -> dict[str, Any]:
        """The run through Flower's simulation engine; it writes the same run folder."""
        from fedoap.federation.flower_launch import run_simulation

        run = run_simulation(rd.root, len(cfg.data.clients), resume=resume)
        summary = dict(json.loads(rd.summary.read_text()))
        keys = ("run-id", "status", "elapsed", "network-traffic")
        summary["flower"] = {k: run.get(k) for k in keys}
        rd.write_json(rd.summary, summary)
        rd.remove_stale_temporaries()  # the ServerApp could not: this process holds the lock
        return summary


RUNTIMES: dict[str, Runtime] = {
    "inprocess": InProcessRuntime(),
    "flower-sim": FlowerSimulationRuntime(),
}


def runtime_for(cfg: Config, alg: Algorithm) -> Runtime:
    """The runtime ``federation.runtime`` names, after it has checked that it can run ``alg``."""
    runtime = RUNTIMES[cfg.federation.runtime]
    runtime.check(cfg, alg)
    return runtime
