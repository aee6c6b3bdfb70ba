"""The in-process federation runner: every client in one Python process, one after another.

Protocol (method.md, "Training protocol"):

1. Federated stage, rounds 1..R: the sampled clients run ``algorithm.fit`` from the current
   global arrays and their own state; the server runs ``algorithm.aggregate``. Then *every*
   client scores its personalised model on its **validation** split, and keeps it if it is its
   best so far.
2. Fine-tuning stage (methods that have one), epochs 1..F, logged as rounds R+1..R+F: each
   client starts from its best validated federated model and fine-tunes locally; the model is
   validated after every epoch and the best is kept.
3. Test: each client's selected model is scored on its **test** split, once, at the end.

A checkpoint is written atomically after every round and every fine-tuning epoch, with the
global arrays, each client's state and best model, and the metric history, so a killed run
resumes exactly (all randomness is derived from (seed, stage, round, client)). ``summary.json``
is written last: a run folder without it is unfinished, and ``--resume`` completes it.

A client whose training diverges (non-finite loss or weights) never reaches the aggregate or the
results: the run stops with a :class:`~fedoap.errors.DivergedError` naming the client, round and
step, or, with ``train.on_divergence=exclude``, that client is dropped from the rest of the run
and listed under ``summary.json``'s ``excluded``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fedoap.algorithms import KV, Algorithm, FitContext, Update, nbytes
from fedoap.algorithms.base import to_device
from fedoap.config import Config
from fedoap.data.dataset import ClientData, pool_training_sets
from fedoap.errors import CheckpointError, DivergedError, FederationError
from fedoap.federation.protocol import check_upload
from fedoap.federation.state import (
    RunState,
    SiteState,
    load_run_state,
    save_run_state,
    save_selected,
)
from fedoap.federation.summary import make_summary
from fedoap.models import FedOAPNet, StateDict
from fedoap.runs import RunDir
from fedoap.training import evaluate
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
from fedoap.training.engine import nonfinite_keys, predict_logits

POOLED = "__pooled__"  # the single trainer of ``centralized`` (not a client name: has '_' x2)


@dataclass
class Position:
    """Where a run is: the last completed round (federated) or epoch (finetune)."""

    stage: str
    done: int


@dataclass
class ClientRecord(SiteState):
    """A client's part of the run state (its algorithm state and selected model, and whether it
    was excluded) with its data, as the in-process runner holds them."""

    data: ClientData = field(kw_only=True)


def sample_clients(names: list[str], fraction: float, seed: int, rnd: int) -> list[str]:
    """The clients that train in round ``rnd`` (in their configured order)."""
    k = max(1, round(fraction * len(names)))
    if k >= len(names):
        return list(names)
    chosen = np.random.default_rng([seed, rnd]).choice(len(names), size=k, replace=False)
    return [names[i] for i in sorted(chosen)]


class Runner:
    def __init__(
        self,
        cfg: Config,
        algorithm: Algorithm,
        clients: list[ClientData],
        run_dir: RunDir,
        progress: bool = True,
        log: Callable[[str], None] = print,
        data_seconds: float = 0.0,
    ) -> None:
        self.cfg = cfg
        self.alg = algorithm
        self.run_dir = run_dir
        self.progress = progress
        self.log = log
        self.device = setup(cfg.train)  # a missing device fails here, before any work
        self.timer = Timer(self.device, {"data": data_seconds})
        reset_peak_memory(self.device)
        model = algorithm.build_model()  # on the CPU: initial state is the same on any device
        self.partition = algorithm.partition(model)
        self.template = algorithm.upload_template(model)
        self.global_arrays: StateDict = algorithm.init_global(model)
        init_states = {c.name: algorithm.init_client(model) for c in clients}
        pooled_state = algorithm.init_client(model) if algorithm.pooled else None
        # One model for every client: each client's weights are loaded into it in turn, so it
        # is moved and compiled once per process.
        self.model: FedOAPNet = place(model, cfg.train, self.device)  # type: ignore[assignment]
        with self.timer("data"):
            clients = [c.to(self.device) for c in clients]  # each split crosses to the device once
        self.server: StateDict = {}
        self.ft_extra: StateDict = {}  # algorithm's extra payload for the fine-tuning stage
        self.records = {c.name: ClientRecord(init_states[c.name], data=c) for c in clients}
        # ``centralized``: one trainer on the pooled training sets instead of the clients.
        self.pooled = (
            ClientRecord(pooled_state, data=pool_training_sets(clients))
            if pooled_state is not None
            else None
        )
        self.rows: list[dict[str, Any]] = []
        self.round_seconds: list[float] = []
        self.bytes_up: list[int] = []  # one entry per (round, sampled client)
        self.bytes_down: list[int] = []  # one entry per (round, client that received)
        self.position = Position("federated", 0)
        self.elapsed = 0.0

    # ------------------------------------------------------------------ public

    @property
    def names(self) -> list[str]:
        return list(self.records)

    @property
    def active(self) -> dict[str, ClientRecord]:
        """The clients still in the run (all of them unless one diverged and was excluded)."""
        return {n: r for n, r in self.records.items() if r.diverged is None}

    @property
    def finetune_epochs(self) -> int:
        return self.cfg.finetune.epochs if self.alg.has_finetune else 0

    def run(self) -> dict[str, Any]:
        # Out of memory: the last checkpoint is intact; the message says what to change.
        with (
            session(self.cfg.train, self.device),
            oom_guard(self.cfg.train, self.cfg.data.image_size, self.device),
        ):
            return self._run()

    def _run(self) -> dict[str, Any]:
        note = precision_note(self.cfg.train.precision, self.device)
        if note:
            self.log(f"note: {note}")
        start = time.perf_counter() - self.elapsed
        if self.cfg.train.compile:
            with self.timer("compile"):
                self._warm_up()
        total = self.cfg.federation.rounds + self.finetune_epochs
        done = self._steps_done()
        bar = tqdm(
            total=total,
            initial=done,
            desc=f"{self.alg.name}",
            unit="round",
            disable=not self.progress,
            leave=True,
        )
        while (
            self.position.stage == "federated" and self.position.done < self.cfg.federation.rounds
        ):
            t0 = time.perf_counter()
            self._federated_round(self.position.done + 1)
            self.round_seconds.append(time.perf_counter() - t0)
            self.position.done += 1
            self.elapsed = time.perf_counter() - start
            # The last round's state is saved by the stage change below, a moment later.
            done, every = self.position.done, self.cfg.federation.checkpoint_every
            with self.timer("checkpoint"):
                self._checkpoint(tensors=done % every == 0 and done < self.cfg.federation.rounds)
            bar.update(1)
            bar.set_postfix(self._postfix())
        if self.position.stage == "federated":
            self.position = Position("finetune", 0)
            if self.finetune_epochs:
                self._start_finetune()
            with self.timer("checkpoint"):
                self._checkpoint()
        while self.position.stage == "finetune" and self.position.done < self.finetune_epochs:
            self._finetune_epoch(self.position.done + 1)
            self.position.done += 1
            self.elapsed = time.perf_counter() - start
            done, every = self.position.done, self.cfg.federation.checkpoint_every
            with self.timer("checkpoint"):
                self._checkpoint(tensors=done % every == 0 or done == self.finetune_epochs)
            bar.update(1)
            bar.set_postfix(self._postfix())
        bar.close()
        self.elapsed = time.perf_counter() - start
        summary = self._finish()
        return summary

    # ------------------------------------------------------------------ stages

    def _warm_up(self) -> None:
        """Compile before the first round, so that the compile cost is reported on its own.

        One forward/backward in training mode and one forward in evaluation mode, at the
        shapes training and validation use, on the first client's images; the model's weights
        and buffers are restored afterwards and nothing else is touched, so the run's results
        are those of an uncompiled warm-up-free run. Later shapes (a smaller last batch) compile
        on first use and are charged to the phase that meets them.
        """
        rec = next(iter(self._all_records().values()))
        t = self.cfg.train
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        x = rec.data.train.x[: t.batch_size]
        self.model.train()
        with autocast(t.precision, self.device.type):
            out = self.model(x)
        out.float().mean().backward()
        self.model.zero_grad(set_to_none=True)
        predict_logits(self.model, rec.data.val.x[: t.eval_batch_size], t.precision)
        self.model.load_state_dict(saved)

    def _inner_bar(self, desc: str, total: int) -> tqdm:
        return tqdm(total=total, desc=desc, unit="img", leave=False, disable=not self.progress)

    def _federated_round(self, rnd: int) -> None:
        cfg = self.cfg
        if self.pooled is not None:
            trainers = {POOLED: self.pooled}
            sampled = self.names
        else:
            # Sampled from every client, so excluding one leaves the others' draws unchanged.
            sampled = sample_clients(self.names, cfg.federation.fraction, cfg.seed, rnd)
            trainers = {name: self.records[name] for name in sampled if name in self.active}
        payload = self.global_arrays
        down = nbytes(payload)
        updates: list[Update] = []
        losses: dict[str, float] = {}
        for name, rec in trainers.items():
            with (
                self.timer("train"),
                self._inner_bar(
                    f"round {rnd} {name}", len(rec.data.train) * self.alg.passes_per_round()
                ) as ib,
            ):
                ctx = FitContext(name, rnd, cfg.seed, progress=ib.update)
                try:
                    update, rec.state = self.alg.run_fit(
                        self.model, payload, rec.state, rec.data, ctx
                    )
                except DivergedError as err:
                    self._exclude(name, rec, err)
                    continue
            n_train = len(rec.data.train)
            reason = check_upload(update.arrays, update.num_examples, self.template, n_train)
            if reason:  # in-process the upload is fedoap's own: a malformed one is a bug
                raise FederationError(
                    f"client '{name}', round {rnd}: method {self.alg.name} produced an upload "
                    f"the server must refuse ({reason}); this is a bug in the method"
                )
            updates.append(update)
            losses[name] = update.metrics["train_loss"]
            if self.pooled is None:  # pooling moves raw data, not model messages
                self.bytes_up.append(nbytes(update.arrays))
                self.bytes_down.append(down)
        if updates:  # none when every client sampled this round has just been excluded
            with self.timer("aggregate"):
                new = self.alg.aggregate(self.global_arrays, updates, self.server)
            bad = nonfinite_keys(new)
            if bad:
                raise DivergedError(
                    f"round {rnd}: the aggregated global model is not finite ({len(bad)} "
                    f"tensor(s), e.g. {bad[0]}) although every upload was: the server step of "
                    f"method {self.alg.name} diverged (check its algorithm.server_lr, if it has "
                    "one)",
                    round=rnd,
                    stage="aggregate",
                )
            self.global_arrays = new
        for name in self.active:
            loss = losses.get(POOLED, losses.get(name))
            self._validate(name, rnd, "federated", self.global_arrays, loss, name in sampled)

    def _start_finetune(self) -> None:
        """Each client fine-tunes from its best validated federated model."""
        states = {name: rec.state for name, rec in self.active.items()}
        self.ft_extra = self.alg.finetune_payload(self.global_arrays, states)
        for rec in self.active.values():
            rec.state = self.alg.start_finetune(rec.best_weights, rec.state)

    def _ft_payload(self, rec: ClientRecord) -> StateDict:
        # Shared weights are fully overridden by the (complete) personal state; the K/V bank is
        # the one the best model was selected with.
        base = {k: v for k, v in self.global_arrays.items() if not k.startswith(KV)}
        return {**base, **self.ft_extra, **rec.best_kv}

    def _finetune_epoch(self, epoch: int) -> None:
        rnd = self.cfg.federation.rounds + epoch
        for name, rec in self.active.items():
            payload = self._ft_payload(rec)
            with (
                self.timer("train"),
                self._inner_bar(f"fine-tune {epoch} {name}", len(rec.data.train)) as ib,
            ):
                ctx = FitContext(name, rnd, self.cfg.seed, progress=ib.update)
                try:
                    loss, rec.state = self.alg.run_finetune_epoch(
                        self.model, payload, rec.state, rec.data, ctx, first=epoch == 1
                    )
                except DivergedError as err:
                    self._exclude(name, rec, err)
                    continue
            self._validate(name, rnd, "finetune", payload, loss, True)

    def _exclude(self, name: str, rec: ClientRecord, err: DivergedError) -> None:
        """Drop a diverged client from the rest of the run (train.on_divergence=exclude), or
        re-raise: its state from before this step is kept, and is never aggregated again."""
        if self.cfg.train.on_divergence == "stop" or rec is self.pooled:
            raise err
        rec.diverged = {
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

    def _validate(
        self,
        name: str,
        rnd: int,
        stage: str,
        payload: StateDict,
        train_loss: float | None,
        sampled: bool,
    ) -> None:
        rec = self.records[name]
        t0 = time.perf_counter()
        t = self.cfg.train
        with self.timer("validate"):
            self.alg.personalize(self.model, payload, rec.state)
            val = evaluate(self.model, rec.data.val, t.precision, batch_size=t.eval_batch_size)
            score = val[t.select_metric]
            improved = score is not None and score > rec.best_score
            if improved:
                rec.best_score = score
                rec.best_round = rnd
                # Kept on the CPU, in the layout it is saved in.
                rec.best_weights = to_device(
                    self.model.state_dict(), torch.device("cpu"), copy=True
                )
                rec.best_kv = {k: v.clone() for k, v in payload.items() if k.startswith(KV)}
        self.rows.append(
            {
                "round": rnd,
                "stage": stage,
                "client": name,
                "sampled": int(sampled),
                "train_loss": train_loss,
                "val_dice": val["dice"],
                "val_case_dice": val["case_dice"],
                "best": int(improved),
                "seconds": time.perf_counter() - t0,
            }
        )

    def _postfix(self) -> dict[str, str]:
        last = {r["client"]: r["val_dice"] for r in self.rows[-len(self.active) :]}
        return {k[:10]: f"{v:.3f}" for k, v in last.items()}

    def _steps_done(self) -> int:
        if self.position.stage == "federated":
            return self.position.done
        return self.cfg.federation.rounds + self.position.done

    # ------------------------------------------------------------------ test and outputs

    def load_best(self, name: str) -> None:
        """Put client ``name``'s selected model (and its K/V bank) into ``self.model``."""
        rec = self.records[name]
        self.model.load_state_dict(rec.best_weights)
        self.model.set_kv_bank(rec.best_kv.get(KV + "bank"))

    def _finish(self) -> dict[str, Any]:
        clients: dict[str, Any] = {}
        t = self.cfg.train
        for name, rec in self.active.items():
            self.load_best(name)
            with self.timer("test"):
                test = evaluate(
                    self.model, rec.data.test, t.precision, full=True, batch_size=t.eval_batch_size
                )
            save_selected(
                self.run_dir, name, rec.best_weights, rec.best_kv, rec.best_round, self.alg.name
            )
            clients[name] = {
                "n": rec.data.sizes(),
                "best_round": rec.best_round,
                "best_stage": "federated"
                if rec.best_round <= self.cfg.federation.rounds
                else "finetune",
                "val": {self.cfg.train.select_metric: rec.best_score},
                "test": test,
                "notes": rec.data.notes,
            }
        summary = make_summary(
            self.cfg,
            self.alg,
            self.model,
            clients,
            self.bytes_up,
            self.bytes_down,
            nbytes({k: v for k, v in self.global_arrays.items() if k.startswith(KV)}),
            self.elapsed,
            self.round_seconds,
            self.finetune_epochs,
            execution=self.execution(),
            phases=self.timer.seconds,
        )
        excluded = {n: r.diverged for n, r in self.records.items() if r.diverged is not None}
        if excluded:
            summary["excluded"] = excluded
        self.run_dir.write_metrics(self.rows)
        from fedoap.plots import plot_curves  # matplotlib: only when a run ends

        plot_curves(self.rows, self.run_dir.plots, f"{self.alg.name} (seed {self.cfg.seed})")
        # Last: summary.json marks the run complete (a kill before it is finished by --resume).
        self.run_dir.write_json(self.run_dir.summary, summary)
        self.run_dir.remove_stale_temporaries()
        return summary

    def execution(self) -> dict[str, Any]:
        """Where and how this run executed (``summary.json``'s ``execution``)."""
        t = self.cfg.train
        return {
            **describe(self.device),
            "precision": t.precision,
            "native_precision": native_low_precision(t.precision, self.device),
            "compile": t.compile,
            "compile_mode": t.compile_mode if t.compile else None,
            "channels_last": uses_channels_last(t, self.device),
            "deterministic": t.deterministic,
            "tf32": t.tf32,
            "num_threads": torch.get_num_threads(),
            # Of this process: a resumed run reports the peak since it resumed.
            "peak_memory_gib": peak_memory_gib(self.device),
        }

    # ------------------------------------------------------------------ checkpoints

    def _all_records(self) -> dict[str, ClientRecord]:
        return {**self.records, **({POOLED: self.pooled} if self.pooled is not None else {})}

    def _checkpoint(self, tensors: bool = True) -> None:
        """Write ``metrics.csv`` and, when ``tensors``, the resume state ``last.safetensors``
        (``federation.checkpoint_every``: a killed run resumes from the last one written)."""
        if not tensors:
            self.run_dir.write_metrics(self.rows)
            return
        self._save_last()

    def _save_last(self) -> None:
        sites: dict[str, SiteState] = dict(self._all_records())
        history = {
            "elapsed": self.elapsed,
            "rows": self.rows,
            "round_seconds": self.round_seconds,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "phases": self.timer.seconds,
        }
        state = RunState(
            self.cfg.digest(),
            self.global_arrays,
            self.server,
            self.ft_extra,
            sites,
            self.position.stage,
            self.position.done,
            history,
        )
        save_run_state(self.run_dir, state)
        self.run_dir.write_metrics(self.rows)

    def restore(self) -> None:
        """Continue from ``checkpoints/last.safetensors`` (resume), read and checked by
        :func:`~fedoap.federation.state.load_run_state`."""
        rs = load_run_state(self.run_dir, self.cfg.digest(), self._all_records())
        if rs.runtime != "inprocess":
            raise CheckpointError(
                f"{self.run_dir.last} holds the state of a {rs.runtime} run's server only; the "
                "in-process runner cannot resume it"
            )
        self.global_arrays, self.server, self.ft_extra = rs.global_arrays, rs.server, rs.ft_extra
        for name, rec in self._all_records().items():
            site = rs.sites[name]
            rec.state, rec.best_weights, rec.best_kv = site.state, site.best_weights, site.best_kv
            rec.best_score, rec.best_round, rec.diverged = (
                site.best_score,
                site.best_round,
                site.diverged,
            )
        self.position = Position(rs.stage, rs.done)
        h = rs.history
        self.elapsed, self.rows, self.round_seconds = h["elapsed"], h["rows"], h["round_seconds"]
        self.bytes_up, self.bytes_down = h["bytes_up"], h["bytes_down"]
        # Time already spent per phase; this process's data loading is added to it.
        for phase, sec in h.get("phases", {}).items():
            self.timer.seconds[phase] = self.timer.seconds.get(phase, 0.0) + sec
