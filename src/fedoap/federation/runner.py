"""The in-process runtime: every client in one Python process, one after another.

The protocol itself (rounds, validation and selection, fine-tuning, the test, the run state) is
written once, in :mod:`fedoap.federation.server` (the server's side) and
:mod:`fedoap.federation.site` (a site's side); here, the transport is a direct call of each
site's :meth:`~fedoap.federation.site.Site.handle`, and the server's checkpoint holds every
site's state too, so a killed run resumes exactly (all randomness is derived from (seed, stage,
round, client)). ``summary.json`` is written last: a run folder without it is unfinished, and
``--resume`` completes it.

A client whose training diverges (non-finite loss or weights) never reaches the aggregate or the
results: the run stops with a :class:`~fedoap.errors.DivergedError` naming the client, round and
step, or, with ``train.on_divergence=exclude``, that client is dropped from the rest of the run
and listed under ``summary.json``'s ``excluded``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from fedoap.algorithms import Algorithm
from fedoap.config import Config
from fedoap.data.dataset import ClientData, pool_training_sets
from fedoap.errors import CheckpointError
from fedoap.federation.attacks import make_site
from fedoap.federation.pooled import POOLED, PooledServer
from fedoap.federation.server import Server
from fedoap.federation.site import Reply, Site, Step
from fedoap.federation.state import RunState, SiteState, load_run_state, save_selected
from fedoap.models import FedOAPNet, StateDict
from fedoap.runs import RunDir
from fedoap.training.device import (
    Timer,
    autocast,
    describe,
    native_low_precision,
    oom_guard,
    peak_memory_gib,
    place,
    precision_note,
    reset_peak_memory,
    session,
    setup,
    uses_channels_last,
)
from fedoap.training.engine import predict_logits

__all__ = ["InProcess", "Runner"]

logger = logging.getLogger(__name__)


class InProcess:
    """The in-process transport: each step is a call of the site's ``handle``."""

    runtime = "inprocess"
    label = ""
    trusted = True
    holds_site_states = True

    def __init__(self, sites: dict[str, Site], execution: Callable[[], dict[str, Any]]) -> None:
        self.sites = sites
        self._execution = execution

    def exchange(
        self, steps: dict[str, Step], global_arrays: StateDict, ft_extra: StateDict
    ) -> tuple[dict[str, Reply], dict[str, str]]:
        replies = {n: self.sites[n].handle(s, global_arrays, ft_extra) for n, s in steps.items()}
        return replies, {}

    def site_states(self) -> dict[str, SiteState]:
        return {n: s.record for n, s in self.sites.items()}

    def restore_sites(self, rs: RunState) -> None:
        for name, site in self.sites.items():
            site.record = rs.sites[name]

    def history(self) -> dict[str, Any]:
        return {}

    def restore_history(self, history: dict[str, Any]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"execution": self._execution()}


class Runner:
    def __init__(
        self,
        cfg: Config,
        algorithm: Algorithm,
        clients: list[ClientData],
        run_dir: RunDir,
        progress: bool = True,
        data_seconds: float = 0.0,
    ) -> None:
        self.cfg = cfg
        self.alg = algorithm
        self.run_dir = run_dir
        self.progress = progress
        self.device = setup(cfg.train)  # a missing device fails here, before any work
        f, default = cfg.federation, type(cfg.federation)()
        unused = [
            f"federation.{k}"
            for k in ("round_timeout_s", "min_fit_fraction")
            if getattr(f, k) != getattr(default, k)
        ]
        if unused:  # no site can be lost in one process
            logger.warning(f"{', '.join(unused)} apply to Flower runs only; ignored in-process")
        self.timer = Timer(self.device, {"data": data_seconds})
        reset_peak_memory(self.device)
        model = algorithm.build_model()  # on the CPU: initial state is the same on any device
        init_states = {c.name: algorithm.init_client(model) for c in clients}
        pooled_state = algorithm.init_client(model) if algorithm.pooled else None
        # One model for every client: each client's weights are loaded into it in turn, so it
        # is moved and compiled once per process.
        self.model: FedOAPNet = place(  # type: ignore[assignment]
            model, cfg.train, self.device, per_example_grads=cfg.privacy.dp.enabled
        )
        with self.timer("data"):
            clients = [c.to(self.device) for c in clients]  # each split crosses to the device once
        sites = {c.name: self._site(c, SiteState(init_states[c.name])) for c in clients}
        if pooled_state is not None:  # ``centralized``: one trainer on the pooled training sets
            sites[POOLED] = self._site(pool_training_sets(clients), SiteState(pooled_state))
        self.sites = sites
        self.transport = InProcess(sites, self.execution)
        server = PooledServer if algorithm.pooled else Server
        self.server = server(
            cfg,
            algorithm,
            self.transport,
            run_dir,
            [c.name for c in clients],
            {c.name: len(c.train) for c in clients},
            model,
            self.timer,
            progress=progress,
        )

    def _site(self, data: ClientData, record: SiteState) -> Site:
        return make_site(
            self.cfg,
            self.alg,
            self.model,
            data,
            record,
            self.timer,
            bar=self._inner_bar,
            on_selected=self._save_selected,
        )

    def _save_selected(self, site: Site) -> None:
        assert site.final is not None
        weights, kv = site.final
        save_selected(
            self.run_dir,
            site.name,
            weights,
            kv,
            site.record.best_round,
            self.alg.name,
            self.cfg.digest(),
        )

    @contextlib.contextmanager
    def _inner_bar(self, desc: str, total: int) -> Iterator[Callable[[int], Any]]:
        with tqdm(total=total, desc=desc, unit="img", leave=False, disable=not self.progress) as b:
            yield b.update

    @property
    def position(self) -> tuple[str, int]:
        return self.server.stage, self.server.done

    def run(self) -> dict[str, Any]:
        # Out of memory: the last checkpoint is intact; the message says what to change.
        with (
            session(self.cfg.train, self.device),
            oom_guard(self.cfg.train, self.cfg.data.image_size, self.device),
        ):
            note = precision_note(self.cfg.train.precision, self.device)
            if note:
                logger.info(f"note: {note}")
            if self.cfg.train.compile:
                with self.timer("compile"):
                    self._warm_up()
            return self.server.run()

    def _warm_up(self) -> None:
        """Compile before the first round, so that the compile cost is reported on its own.

        One forward/backward in training mode and one forward in evaluation mode, at the
        shapes training and validation use, on the first client's images; the model's weights
        and buffers are restored afterwards and nothing else is touched, so the run's results
        are those of an uncompiled warm-up-free run. Later shapes (a smaller last batch) compile
        on first use and are charged to the phase that meets them.
        """
        data = next(iter(self.sites.values())).data
        t = self.cfg.train
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        x = data.train.x[: t.batch_size]
        self.model.train()
        with autocast(t.precision, self.device.type):
            out = self.model(x)
        out.float().mean().backward()
        self.model.zero_grad(set_to_none=True)
        predict_logits(self.model, data.val.x[: t.eval_batch_size], t.precision)
        self.model.load_state_dict(saved)

    def execution(self) -> dict[str, Any]:
        """Where and how this run executed (``summary.json``'s ``execution``)."""
        t = self.cfg.train
        return {
            **describe(self.device),
            "precision": t.precision,
            "native_precision": native_low_precision(t.precision, self.device),
            "compile": t.compile,
            "compile_mode": t.compile_mode if t.compile else None,
            "channels_last": uses_channels_last(t, self.device, self.cfg.privacy.dp.enabled),
            "deterministic": t.deterministic,
            "tf32": t.tf32,
            "num_threads": torch.get_num_threads(),
            # Of this process: a resumed run reports the peak since it resumed.
            "peak_memory_gib": peak_memory_gib(self.device),
        }

    def restore(self) -> None:
        """Continue from ``checkpoints/last.safetensors`` (resume), read and checked by
        :func:`~fedoap.federation.state.load_run_state`."""
        rs = load_run_state(self.run_dir, self.cfg.digest(), self.sites)
        if rs.runtime != "inprocess":
            raise CheckpointError(
                f"{self.run_dir.last} holds the state of a {rs.runtime} run's server only; the "
                "in-process runner cannot resume it"
            )
        self.server.restore(rs)
