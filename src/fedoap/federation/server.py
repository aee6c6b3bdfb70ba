"""The server's side of the protocol, written once for every transport.

:class:`Server` owns the run: the global arrays, the server state, the round loop and client
sampling, what it accepts from the sites (:func:`~fedoap.federation.protocol.check_upload`),
aggregation, the fine-tuning and test steps, the metric history, the checkpoint
(:mod:`fedoap.federation.state`) and ``summary.json``. How a :class:`~fedoap.federation.site.Step`
reaches a site and its :class:`~fedoap.federation.site.Reply` comes back is the
:class:`Transport`'s business: the in-process runner calls each site's
:meth:`~fedoap.federation.site.Site.handle` directly; the Flower ServerApp sends one message per
site per step.

A site that does not reply within ``federation.round_timeout_s`` is *lost* for that step: the
round goes on with the others if at least ``federation.min_fit_fraction`` of the sites sampled
to train replied, and the loss is recorded (``summary.json``'s ``lost``). A lost site that comes
back is sent the next step and continues from its own saved state (``rejoined``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from fedoap.algorithms import KV, SHARED, Algorithm, Update, nbytes
from fedoap.config import Config
from fedoap.errors import DivergedError, FederationError
from fedoap.federation import safeguard
from fedoap.federation.protocol import Template, check_upload
from fedoap.federation.site import Reply, Step
from fedoap.federation.state import RunState, SiteState, save_run_state
from fedoap.federation.summary import make_summary
from fedoap.metrics import CASE_FIELDS
from fedoap.models import FedOAPNet, StateDict
from fedoap.privacy import privacy_summary
from fedoap.runs import RunDir
from fedoap.training.device import Timer
from fedoap.training.engine import nonfinite_keys

POOLED = "__pooled__"  # the single trainer of ``centralized`` (not a client name: has '_' x2)


def update_norm(arrays: StateDict, global_arrays: StateDict) -> float:
    """``||upload - global||_2`` over the shared floating tensors both hold (in float64)."""
    total = 0.0
    for k, v in arrays.items():
        if k.startswith(SHARED) and v.is_floating_point() and k in global_arrays:
            total += float((v.double() - global_arrays[k].double().to(v.device)).square().sum())
    return math.sqrt(total)


def summary_norm(arrays: StateDict) -> float:
    """``||summary||_2`` of an upload's floating ``kv.*`` tensors (0 without any)."""
    total = 0.0
    for k, v in arrays.items():
        if k.startswith(KV) and v.is_floating_point():
            total += float(v.double().square().sum())
    return math.sqrt(total)


def sample_clients(names: list[str], fraction: float, seed: int, rnd: int) -> list[str]:
    """The clients that train in round ``rnd`` (in their configured order)."""
    k = max(1, round(fraction * len(names)))
    if k >= len(names):
        return list(names)
    chosen = np.random.default_rng([seed, rnd]).choice(len(names), size=k, replace=False)
    return [names[i] for i in sorted(chosen)]


class Transport(Protocol):
    """How steps reach the sites."""

    #: "inprocess" or "flower": recorded in the checkpoint.
    runtime: str
    #: Uploads come from this process's own code: a malformed one is a bug, not a bad site.
    trusted: bool

    def exchange(
        self, steps: dict[str, Step], global_arrays: StateDict, ft_extra: StateDict
    ) -> tuple[dict[str, Reply], dict[str, str]]:
        """Send each named site its step; returns the replies and the lost sites (name ->
        why) of those that did not reply."""
        ...

    def site_states(self) -> dict[str, SiteState]:
        """The site states the server's checkpoint holds (in-process: every one; on Flower:
        none, sites keep their own)."""
        ...

    def restore_sites(self, rs: RunState) -> None:
        """Put the checkpoint's site states back (in-process) or nothing (Flower)."""
        ...

    def finetune_payload(self, global_arrays: StateDict, active: list[str]) -> StateDict:
        """The method's extra fine-tuning payload (FedDP needs every site's state: in-process
        only)."""
        ...

    def history(self) -> dict[str, Any]:
        """Transport-specific history kept in the checkpoint (e.g. Flower's byte counts)."""
        ...

    def restore_history(self, history: dict[str, Any]) -> None: ...

    def describe(self) -> dict[str, Any]:
        """Extra ``summary.json`` fields (``execution``, transport timings)."""
        ...


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
        log: Callable[[str], None] = print,
    ) -> None:
        self.cfg, self.alg, self.transport = cfg, alg, transport
        self.run_dir, self.names, self.train_sizes = run_dir, names, train_sizes
        self.model, self.timer, self.progress, self.log = model, timer, progress, log
        self.template: Template = alg.upload_template(model)
        self.global_arrays: StateDict = alg.init_global(model)
        self.server: StateDict = {}
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

    # ------------------------------------------------------------------ state

    @property
    def active(self) -> list[str]:
        return [n for n in self.names if n not in self.excluded]

    @property
    def finetune_epochs(self) -> int:
        return self.cfg.finetune.epochs if self.alg.has_finetune else 0

    def restore(self, rs: RunState) -> None:
        self.global_arrays, self.server, self.ft_extra = rs.global_arrays, rs.server, rs.ft_extra
        self.stage, self.done = rs.stage, rs.done
        h = rs.history
        self.elapsed, self.rows, self.round_seconds = h["elapsed"], h["rows"], h["round_seconds"]
        self.bytes_up, self.bytes_down = h["bytes_up"], h["bytes_down"]
        self.losses = dict(h.get("losses", {}))
        self.site_seconds = dict(h.get("site_seconds", {}))
        self.excluded = dict(h.get("excluded", {}))
        self.lost = list(h.get("lost", []))
        # Checkpoints before issue 15 named the site "client".
        self.refused = [
            {"round": r["round"], "site": r.get("site", r.get("client")), "reason": r["reason"]}
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
                    self.server,
                    self.ft_extra,
                    self.transport.site_states(),
                    self.stage,
                    self.done,
                    history,
                    runtime=self.transport.runtime,
                )
                save_run_state(self.run_dir, state)
            self.run_dir.write_metrics(self.rows)

    def _save_now(self, last_of_stage: bool = False) -> bool:
        """Whether this step's checkpoint carries tensors (``federation.checkpoint_every``; a
        Flower server's checkpoint is small and sites keep only their last few steps, so it
        saves every step)."""
        every = 1 if self.transport.runtime != "inprocess" else self.cfg.federation.checkpoint_every
        return last_of_stage or self.done % every == 0

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
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
            if epochs:
                extra = self.transport.finetune_payload(self.global_arrays, self.active)
                if extra:  # a method whose fine-tuning needs the server's arrays (FedDP)
                    shared = {k: v for k, v in self.global_arrays.items() if not k.startswith(KV)}
                    self.ft_extra = {**shared, **extra}
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

    def _case_rows(self) -> list[dict[str, Any]]:
        """Each site's per-case test scores (its test entry's ``test.cases``), taken out of the
        entry: they go to ``test_cases.csv``, not ``summary.json``."""
        rows: list[dict[str, Any]] = []
        for name, entry in self.tests.items():
            cases = entry["test"].pop("cases", None)
            for case in cases if isinstance(cases, list) else []:
                if isinstance(case, dict):  # a site's own fields; the client is the sender
                    rows.append(
                        {**{k: v for k, v in case.items() if k in CASE_FIELDS}, "client": name}
                    )
        return rows

    def _federated_step(self, rnd: int) -> None:
        """Round ``rnd``: validation of round ``rnd - 1`` and training of round ``rnd`` in one
        step, then aggregation."""
        cfg = self.cfg
        # Sampled from every client, so excluding one leaves the others' draws unchanged.
        sampled = sample_clients(self.names, cfg.federation.fraction, cfg.seed, rnd)
        trainers = [POOLED] if self.alg.pooled else [n for n in sampled if n not in self.excluded]
        steps = {
            n: Step(rnd, "federated", validate=rnd > 1, fit=n in trainers) for n in self.active
        }
        if self.alg.pooled:
            steps[POOLED] = Step(rnd, "federated", fit=True)
        replies = self._exchange(steps, self.global_arrays)
        updates: list[Update] = []
        senders: list[str] = []
        self.losses = {}
        for name in trainers:
            reply = replies.get(name)
            if reply is None or reply.update is None:
                continue  # lost, excluded (diverged) or refused: recorded where it happened
            update = reply.update
            if name != POOLED:  # pooling moves raw data, not model messages
                self.bytes_down.append(nbytes(self.global_arrays))
            checked = cfg.federation.validate_updates  # false: no defence (measurement)
            reason = check_upload(
                update.arrays,
                update.num_examples,
                self.template,
                self.train_sizes.get(name) if name != POOLED else None,
                values=checked,
            )
            loss = update.metrics.get("train_loss")
            finite = isinstance(loss, float | int) and math.isfinite(loss)
            if reason is None and checked and not finite:
                reason = f"train loss {loss!r} is not a finite number"
            attacker = name in cfg.federation.attack.sites  # measurement: a poisoned upload
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
            if name != POOLED:  # pooling moves raw data, not model messages
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
                new = self.alg.aggregate(self.global_arrays, updates, self.server)
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
            self.log(f"warning: round {rnd}: no upload was accepted; the global model is kept")

    def _check_norms(self, rnd: int, senders: list[str], updates: list[Update]) -> list[Update]:
        """Refuse the uploads whose update norm ``||upload - global||`` (over the shared floating
        tensors) exceeds ``federation.max_update_norm_ratio`` times the round's median, and
        return the others. A judgement on values, not a malformed upload: recorded as refused on
        either transport, never taken for a bug."""
        ratio = self.cfg.federation.max_update_norm_ratio
        if not self.cfg.federation.validate_updates:
            ratio = None
        if ratio is None or len(updates) < 3:  # with two, neither is an outlier of the other
            return updates
        norms = [update_norm(u.arrays, self.global_arrays) for u in updates]
        # K/V summaries (bank mode) have no global counterpart to subtract: their own norms.
        summaries = [summary_norm(u.arrays) for u in updates]
        median = float(np.median(norms))
        median_s = float(np.median(summaries))
        kept = []
        for name, u, norm, snorm in zip(senders, updates, norms, summaries, strict=True):
            why = None
            if norm > ratio * median:
                why = (
                    f"update norm {norm:.4g} is {norm / median:.3g} x the round's median "
                    f"{median:.4g} (federation.max_update_norm_ratio={ratio:g})"
                )
            elif snorm > ratio * median_s:
                why = (
                    f"K/V summary norm {snorm:.4g} is {snorm / median_s:.3g} x the round's "
                    f"median {median_s:.4g} (federation.max_update_norm_ratio={ratio:g})"
                )
            if why is not None:
                self._refuse(rnd, name, why)
                self.losses.pop(name, None)
                continue
            kept.append(u)
        return kept

    def _exchange(self, steps: dict[str, Step], global_arrays: StateDict) -> dict[str, Reply]:
        """Send the steps; record validation rows, divergence and lost sites."""
        replies, lost = self.transport.exchange(steps, global_arrays, self.ft_extra)
        for name, why in lost.items():
            rnd = steps[name].round
            self.lost.append(
                {"round": rnd, "client": name, "stage": steps[name].stage, "reason": why}
            )
            self.log(f"warning: step {rnd}: site '{name}' was lost ({why}); the run goes on")
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
                    row["sampled"] = int(self.alg.pooled or name in sampled)
                    row["train_loss"] = self.losses.get(POOLED, self.losses.get(name))
                    # Why the server refused this site's upload of that round, if it did.
                    row["refused"] = next(
                        (
                            r["reason"]
                            for r in self.refused
                            if (r["round"], r["site"]) == (rnd, name)
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
        self.refused.append({"round": rnd, "site": site, "reason": reason})
        self.log(f"warning: round {rnd}: refused site '{site}''s update: {reason}")

    def _exclude(self, name: str, err: DivergedError) -> None:
        """Drop a diverged client from the rest of the run (train.on_divergence=exclude), or
        re-raise: its state from before the failed step is kept and never aggregated again."""
        if self.cfg.train.on_divergence == "stop" or name == POOLED:
            raise err
        self.excluded[name] = {
            "stage": err.stage,
            "round": err.round,
            "step": err.step,
            "reason": str(err),
        }
        self.log(
            f"warning: client '{name}' is excluded from the rest of the run "
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
        cases = self._case_rows()
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
        privacy = privacy_summary(self.cfg, self.tests, self.server)
        if privacy is not None:  # each site's spent budget, in one place
            summary["privacy"] = privacy
            for entry in summary["clients"].values():
                entry.pop("privacy", None)
        for key in ("excluded", "refused", "lost"):
            if getattr(self, key):
                summary[key] = getattr(self, key)
        if safeguard.enabled(self.cfg):  # what the sites kept, and what the stage cost
            chosen = [e["safeguard"]["choice"] for e in self.tests.values() if "safeguard" in e]
            summary["safeguard"] = {
                "mode": self.cfg.safeguard.mode,
                "kept": {c: chosen.count(c) for c in safeguard.CHOICES},
            }
            # What the stage cost, summed over the sites, on either transport.
            summary["time"]["safeguard_seconds"] = round(self.site_seconds.get("safeguard", 0), 3)
        self.run_dir.write_metrics(self.rows)
        self.run_dir.write_cases(cases)
        from fedoap.plots import plot_curves  # matplotlib: only when a run ends

        title = self.alg.name + (" on Flower" if self.transport.runtime == "flower" else "")
        plot_curves(self.rows, self.run_dir.plots, f"{title} (seed {self.cfg.seed})")
        # Last: summary.json marks the run complete (a kill before it is finished by --resume).
        self.run_dir.write_json(self.run_dir.summary, summary)
        self.run_dir.remove_stale_temporaries()
        return summary
