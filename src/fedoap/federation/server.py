"""The server's side of the protocol, written once for every transport.

:class:`Server` owns the run: the global arrays, the server state, the round loop and client
sampling, what it accepts from the sites (:func:`~fedoap.federation.protocol.check_upload`),
aggregation, the fine-tuning and test steps, the metric history, the checkpoint
(:mod:`fedoap.federation.state`) and ``summary.json``. How a :class:`~fedoap.federation.site.Step`
reaches a site and its :class:`~fedoap.federation.site.Reply` comes back is the
:class:`~fedoap.federation.transport.Transport`'s business: the in-process runner calls each site's
:meth:`~fedoap.federation.site.Site.handle` directly; the Flower ServerApp sends one message per
site per step.

A site that does not reply within ``federation.round_timeout_s`` is *lost* for that step: the
round goes on with the others if at least ``federation.min_fit_fraction`` of the sites sampled
to train replied, and the loss is recorded (``summary.json``'s ``lost``). A lost site that comes
back is sent the next step and continues from its own saved state (``rejoined``).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from tqdm.auto import tqdm

from fedoap.aggregation import build_aggregation
from fedoap.algorithms import Algorithm
from fedoap.basetypes import KV, Update, nbytes
from fedoap.config import Config
from fedoap.errors import DivergedError, FederationError
from fedoap.federation import safeguard
from fedoap.federation.protocol import Template, check_upload, norm_outliers, sample_clients
from fedoap.federation.site import Reply, Step
from fedoap.federation.state import RunState, save_run_state
from fedoap.federation.summary import add_outcomes, make_summary, take_case_rows
from fedoap.federation.transport import Transport
from fedoap.models import FedOAPNet, StateDict
from fedoap.runs import RunDir
from fedoap.tracking import Tracker, open_tracker
from fedoap.training.device import Timer
from fedoap.training.engine import nonfinite_keys

logger = logging.getLogger(__name__)


class Server:
    def __init__(
        self,
        cfg: Config,
        alg: Algorithm,
        transport: Transport,
        run_dir: RunDir,
        names: list[str],
        train_sizes: dict[str, int],
        model: FedOAPNet,
        timer: Timer,
        progress: bool = False,
    ) -> None:
        self.cfg, self.alg, self.transport = cfg, alg, transport
        self.run_dir, self.names, self.train_sizes = run_dir, names, train_sizes
        self.model, self.timer, self.progress = model, timer, progress
        self.template: Template = alg.upload_template(model)
        self.global_arrays: StateDict = alg.init_global(model)
        self.server_state: StateDict = {}  # the method's and the policy's server-side tensors
        self.aggregation = build_aggregation(cfg)
        self.ft_extra: StateDict = {}
        self.stage, self.done = "federated", 0
        self.rows: list[dict[str, Any]] = []
        self.round_seconds: list[float] = []
        self.bytes_up: list[int] = []  # one entry per (round, site that uploaded)
        self.bytes_down: list[int] = []  # one entry per (round, site sent the global arrays)
        self.losses: dict[str, float] = {}  # the last round's train loss per site
        self.excluded: dict[str, dict[str, Any]] = {}
        self.refused: list[dict[str, Any]] = []
        self.lost: list[dict[str, Any]] = []
        self.elapsed = 0.0
        self.tests: dict[str, Any] = {}
        # Seconds the sites spent per phase, summed over sites and steps (what they reported).
        self.site_seconds: dict[str, float] = {}
        self.tracker = Tracker()  # opened by run(): a resumed run reports where it started

    # ------------------------------------------------------------------ state

    @property
    def active(self) -> list[str]:
        return [n for n in self.names if n not in self.excluded]

    @property
    def finetune_epochs(self) -> int:
        return self.cfg.finetune.epochs if self.alg.has_finetune else 0

    def restore(self, rs: RunState) -> None:
        self.global_arrays, self.server_state, self.ft_extra = (
            rs.global_arrays,
            rs.server,
            rs.ft_extra,
        )
        self.stage, self.done = rs.stage, rs.done
        h = rs.history
        self.elapsed, self.rows, self.round_seconds = h["elapsed"], h["rows"], h["round_seconds"]
        self.bytes_up, self.bytes_down = h["bytes_up"], h["bytes_down"]
        self.losses = dict(h.get("losses", {}))
        self.site_seconds = dict(h.get("site_seconds", {}))
        self.excluded = dict(h.get("excluded", {}))
        self.lost = list(h.get("lost", []))
        # Older checkpoints name a refused upload's client "site".
        self.refused = [
            {"round": r["round"], "client": r.get("client", r.get("site")), "reason": r["reason"]}
            for r in h.get("refused", [])
        ]
        self.transport.restore_history(h.get("transport", {}))
        self.transport.restore_sites(rs)
        # Time already spent per phase; this process's data loading is added to it.
        for phase, sec in h.get("phases", {}).items():
            self.timer.seconds[phase] = self.timer.seconds.get(phase, 0.0) + sec

    def checkpoint(self, tensors: bool = True) -> None:
        """``metrics.csv`` and, when ``tensors``, the resume state (``last.safetensors``)."""
        with self.timer("checkpoint"):
            if tensors:
                history = {
                    "elapsed": self.elapsed,
                    "rows": self.rows,
                    "round_seconds": self.round_seconds,
                    "bytes_up": self.bytes_up,
                    "bytes_down": self.bytes_down,
                    "phases": self.timer.seconds,
                    "losses": self.losses,
                    "excluded": self.excluded,
                    "refused": self.refused,
                    "lost": self.lost,
                    "site_seconds": self.site_seconds,
                    "transport": self.transport.history(),
                }
                state = RunState(
                    self.cfg.digest(),
                    self.global_arrays,
                    self.server_state,
                    self.ft_extra,
                    self.transport.site_states(),
                    self.stage,
                    self.done,
                    history,
                    runtime=self.transport.runtime,
                )
                save_run_state(self.run_dir, state)
            self.run_dir.write_metrics(self.rows)
            self.tracker.log_rows(self.rows)

    def _save_now(self, last_of_stage: bool = False) -> bool:
        """Whether this step's checkpoint carries tensors (``federation.checkpoint_every``; a
        Flower server's checkpoint is small and sites keep only their last few steps, so it
        saves every step)."""
        every = self.cfg.federation.checkpoint_every if self.transport.holds_site_states else 1
        return last_of_stage or self.done % every == 0

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        self.tracker = open_tracker(self.cfg, self.run_dir.root)
        start = time.perf_counter() - self.elapsed
        rounds, epochs = self.cfg.federation.rounds, self.finetune_epochs
        bar = tqdm(
            total=rounds + epochs,
            initial=self.done if self.stage == "federated" else rounds + self.done,
            desc=self.alg.name,
            unit="round",
            disable=not self.progress,
            leave=True,
        )
        while self.stage == "federated" and self.done < rounds:
            t0 = time.perf_counter()
            self._federated_step(self.done + 1)
            self.round_seconds.append(time.perf_counter() - t0)
            self.done += 1
            self.elapsed = time.perf_counter() - start
            # The last round's state is saved by the stage change below, a moment later.
            self.checkpoint(tensors=self._save_now() and self.done < rounds)
            bar.update(1)
            bar.set_postfix(self._postfix())
        if self.stage == "federated":
            self.stage, self.done = "finetune", 0
            if epochs and self.alg.sends_personal_models:  # FedDP: every site's own model
                self.ft_extra = self._finetune_payload()
            self.checkpoint()
        while self.stage == "finetune" and self.done < epochs:
            e = self.done + 1
            steps = {n: Step(rounds + e, "finetune", validate=e == 1, epoch=e) for n in self.active}
            self._exchange(steps, self.global_arrays if e == 1 else {})
            self.done = e
            self.elapsed = time.perf_counter() - start
            self.checkpoint(tensors=self._save_now(last_of_stage=e == epochs))
            bar.update(1)
            bar.set_postfix(self._postfix())
        guard = safeguard.steps(self.cfg)  # each site's local-only model (safeguard.mode)
        if self.stage == "finetune" and guard:
            self.stage, self.done = "safeguard", 0
            self.checkpoint()
        while self.stage == "safeguard" and self.done < guard:
            s = self.done + 1
            first = s == 1 and epochs == 0  # round R is still to be validated
            steps = {
                n: Step(rounds + epochs + s, "safeguard", validate=first, epoch=s)
                for n in self.active
            }
            self._exchange(steps, self.global_arrays if first else {})
            self.done = s
            self.elapsed = time.perf_counter() - start
            self.checkpoint(tensors=self._save_now(last_of_stage=s == guard))
        bar.close()
        last = epochs == 0 and guard == 0  # nothing came after round R: validate it now
        test_step = Step(rounds + epochs + guard + 1, "test", validate=last)
        replies = self._exchange(
            {n: test_step for n in self.active}, self.global_arrays if last else {}
        )
        # In the sites' configured order, whatever order their replies came in.
        self.tests = {
            n: replies[n].test for n in self.active if n in replies and replies[n].test is not None
        }
        self.elapsed = time.perf_counter() - start
        return self._finish()

    def _finetune_payload(self) -> StateDict:
        """What a method whose fine-tuning needs every site's own model sends each site: the
        shared arrays and the method's payload over the active sites' states (a transport that
        does not hold them cannot run such a method, and refuses it before the first round)."""
        held = self.transport.site_states()
        missing = [n for n in self.active if n not in held]
        if missing:
            raise FederationError(
                f"method {self.alg.name} needs every site's own model for fine-tuning; this "
                f"transport does not hold the states of {', '.join(missing)}"
            )
        states = {n: held[n].state for n in self.active}
        extra = self.alg.finetune_payload(self.global_arrays, states)
        shared = {k: v for k, v in self.global_arrays.items() if not k.startswith(KV)}
        return {**shared, **extra} if extra else {}

    # ------------------------------------------------------------------ who trains

    def _trainers(self, sampled: list[str]) -> list[str]:
        """The sites that train in a round: the sampled ones still in the run."""
        return [n for n in sampled if n not in self.excluded]

    def _extra_steps(self, rnd: int) -> dict[str, Step]:
        """Steps for trainers that are not sites (none here; ``centralized``'s pooled one)."""
        return {}

    def _sends_models(self, trainer: str) -> bool:
        """Whether a trainer's global arrays and upload travel (counted in ``comm``)."""
        return True

    def _was_sampled(self, site: str, sampled: list[str]) -> bool:
        return site in sampled

    def _train_loss(self, site: str) -> float | None:
        """The training loss a site's row of a round shows."""
        return self.losses.get(site)

    def _can_exclude(self, trainer: str) -> bool:
        """Whether ``train.on_divergence=exclude`` can drop a trainer that diverged."""
        return True

    def _federated_step(self, rnd: int) -> None:
        """Round ``rnd``: validation of round ``rnd - 1`` and training of round ``rnd`` in one
        step, then aggregation."""
        cfg = self.cfg
        # Sampled from every client, so excluding one leaves the others' draws unchanged.
        sampled = sample_clients(self.names, cfg.federation.fraction, cfg.seed, rnd)
        trainers = self._trainers(sampled)
        steps = {
            n: Step(rnd, "federated", validate=rnd > 1, fit=n in trainers) for n in self.active
        }
        steps.update(self._extra_steps(rnd))
        replies = self._exchange(steps, self.global_arrays)
        updates: list[Update] = []
        senders: list[str] = []
        self.losses = {}
        for name in trainers:
            reply = replies.get(name)
            if reply is None or reply.update is None:
                continue  # lost, excluded (diverged) or refused: recorded where it happened
            update = reply.update
            if self._sends_models(name):
                self.bytes_down.append(nbytes(self.global_arrays))
            checked = cfg.federation.validate_updates  # false: no defence (measurement)
            reason = check_upload(
                update.arrays,
                update.num_examples,
                self.template,
                self.train_sizes.get(name),
                values=checked,
            )
            loss = update.metrics.get("train_loss")
            finite = isinstance(loss, float | int) and math.isfinite(loss)
            if reason is None and checked and not finite:
                reason = f"train loss {loss!r} is not a finite number"
            attacker = name in cfg.federation.attack.clients  # measurement: a poisoned upload
            if reason is not None:
                if self.transport.trusted and not attacker:  # fedoap's own code: a bug
                    raise FederationError(
                        f"client '{name}', round {rnd}: method {self.alg.name} produced an "
                        f"upload the server must refuse ({reason}); this is a bug in the method"
                    )
                self._refuse(rnd, name, reason)
                continue
            updates.append(update)
            senders.append(name)
            if finite:
                self.losses[name] = float(loss)  # type: ignore[arg-type]
            if self._sends_models(name):
                self.bytes_up.append(nbytes(update.arrays))
        updates = self._check_norms(rnd, senders, updates)
        replied = sum(1 for n in trainers if n in replies)
        need = math.ceil(cfg.federation.min_fit_fraction * len(trainers) - 1e-9)
        if trainers and replied < need:
            missing = [n for n in trainers if n not in replies]
            raise FederationError(
                f"round {rnd}: {replied} of {len(trainers)} sampled site(s) replied "
                f"(lost: {', '.join(missing)}); federation.min_fit_fraction="
                f"{cfg.federation.min_fit_fraction} needs {need}. The server's checkpoint "
                "after the previous round is intact: fedoap run --resume continues from it"
            )
        if updates:  # none when every site sampled this round was lost, refused or excluded
            with self.timer("aggregate"):
                new = self.alg.aggregate(
                    self.global_arrays, updates, self.server_state, self.aggregation
                )
            bad = nonfinite_keys(new)
            if bad:
                why = (
                    "federation.validate_updates=false let every upload in, finite or not"
                    if not cfg.federation.validate_updates
                    else f"every upload was finite: the server step of method {self.alg.name} "
                    "diverged (check its algorithm.server_lr, if it has one)"
                )
                raise DivergedError(
                    f"round {rnd}: the aggregated global model is not finite ({len(bad)} "
                    f"tensor(s), e.g. {bad[0]}); {why}",
                    round=rnd,
                    stage="aggregate",
                )
            self.global_arrays = new
        elif trainers:
            logger.warning(f"round {rnd}: no upload was accepted; the global model is kept")

    def _check_norms(self, rnd: int, senders: list[str], updates: list[Update]) -> list[Update]:
        """Refuse the uploads whose norms are outliers (:func:`norm_outliers`) and return the
        others. A judgement on values, not a malformed upload: recorded as refused on either
        transport, never taken for a bug."""
        f = self.cfg.federation
        ratio = f.max_update_norm_ratio if f.validate_updates else None
        why = norm_outliers(senders, updates, self.global_arrays, ratio)
        for name, reason in why.items():
            self._refuse(rnd, name, reason)
            self.losses.pop(name, None)
        return [u for name, u in zip(senders, updates, strict=True) if name not in why]

    def _exchange(self, steps: dict[str, Step], global_arrays: StateDict) -> dict[str, Reply]:
        """Send the steps; record validation rows, divergence and lost sites."""
        replies, lost = self.transport.exchange(steps, global_arrays, self.ft_extra)
        for name, why in lost.items():
            rnd = steps[name].round
            self.lost.append(
                {"round": rnd, "client": name, "stage": steps[name].stage, "reason": why}
            )
            logger.warning(f"step {rnd}: site '{name}' was lost ({why}); the run goes on")
        for name in [n for n in steps if n in replies]:  # in the sites' configured order
            reply = replies[name]
            for phase, sec in reply.seconds.items():
                if isinstance(sec, int | float) and math.isfinite(sec):
                    self.site_seconds[phase] = self.site_seconds.get(phase, 0.0) + float(sec)
            for row in reply.rows:
                if row["stage"] == "federated":
                    rnd = row["round"]
                    sampled = sample_clients(
                        self.names, self.cfg.federation.fraction, self.cfg.seed, rnd
                    )
                    row["sampled"] = int(self._was_sampled(name, sampled))
                    row["train_loss"] = self._train_loss(name)
                    # Why the server refused this site's upload of that round, if it did.
                    row["refused"] = next(
                        (
                            r["reason"]
                            for r in self.refused
                            if (r["round"], r["client"]) == (rnd, name)
                        ),
                        None,
                    )
                else:
                    row["sampled"] = 1
                self.rows.append(row)
            if reply.diverged is not None:
                self._exclude(name, reply.diverged)
            if reply.refused is not None:
                self._refuse(steps[name].round, name, reply.refused)
        return replies

    def _refuse(self, rnd: int, site: str, reason: str) -> None:
        self.refused.append({"round": rnd, "client": site, "reason": reason})
        logger.warning(f"round {rnd}: refused site '{site}''s update: {reason}")

    def _exclude(self, name: str, err: DivergedError) -> None:
        """Drop a diverged client from the rest of the run (train.on_divergence=exclude), or
        re-raise: its state from before the failed step is kept and never aggregated again."""
        if self.cfg.train.on_divergence == "stop" or not self._can_exclude(name):
            raise err
        self.excluded[name] = {
            "stage": err.stage,
            "round": err.round,
            "step": err.step,
            "reason": str(err),
        }
        logger.warning(
            f"client '{name}' is excluded from the rest of the run "
            f"(train.on_divergence=exclude): {err.detail} in round {err.round} ({err.stage})"
        )
        if not self.active:
            raise DivergedError(
                f"every client diverged (the last: {err}); nothing is left to report",
                client=name,
                round=err.round,
                stage=err.stage,
            )

    def _postfix(self) -> dict[str, str]:
        last = {r["client"]: r["val_dice"] for r in self.rows[-len(self.active) :]}
        return {k[:10]: f"{v:.3f}" for k, v in last.items()}

    # ------------------------------------------------------------------ outputs

    def _finish(self) -> dict[str, Any]:
        cases = take_case_rows(self.tests)
        described = self.transport.describe()
        summary = make_summary(
            self.cfg,
            self.alg,
            self.model,
            self.tests,
            self.bytes_up,
            self.bytes_down,
            nbytes({k: v for k, v in self.global_arrays.items() if k.startswith(KV)}),
            self.elapsed,
            self.round_seconds,
            self.finetune_epochs,
            execution=described.pop("execution", None),
            phases=self.timer.seconds,
        )
        summary.update(described)
        events = {"excluded": self.excluded, "refused": self.refused, "lost": self.lost}
        add_outcomes(summary, self.cfg, self.server_state, events, self.site_seconds)
        self.run_dir.write_metrics(self.rows)
        self.run_dir.write_cases(cases)
        from fedoap.plots import plot_curves  # matplotlib: only when a run ends

        title = self.alg.name + self.transport.label
        plot_curves(self.rows, self.run_dir.plots, f"{title} (seed {self.cfg.seed})")
        # Last: summary.json marks the run complete (a kill before it is finished by --resume).
        self.run_dir.write_json(self.run_dir.summary, summary)
        self.run_dir.remove_stale_temporaries()
        self.tracker.log_rows(self.rows)
        self.tracker.finish(summary)
        return summary
