"""One site's side of the protocol, the same code on every transport.

The server drives a run in *steps*; each step sends every site one :class:`Step` and the
global arrays, and gets one :class:`Reply` back. Evaluation is folded into the next step, so a
round costs one message per site:

* step ``r`` (rounds 1..R): validate the global model of round ``r - 1`` (when ``r > 1``),
  then, if sampled, train round ``r`` from the same global arrays and upload;
* step ``R + e`` (fine-tuning epochs 1..F): at ``e = 1`` validate round R first, then fine-tune
  one epoch locally and validate;
* steps ``R + F + s`` (``safeguard.mode``, s = 1..S with S = R + F): the site's local-only
  model (:mod:`fedoap.federation.safeguard`): at ``s = 1`` validate round R first when there was
  no fine-tuning, then one round (s <= R) or fine-tuning epoch (s > R) of ``local``'s protocol,
  and validate it;
* step ``R + F + S + 1`` (the test): validate round R when nothing came after it, then (with the
  safeguard) keep the federated model, the local one or a blend of both by validation, and score
  the kept model on the test split, once.

A :class:`Site` holds one client's :class:`~fedoap.federation.state.SiteState` (personal
weights, optimiser state, its best model) and data; the in-process runner keeps one per client in
memory, a Flower SuperNode loads its own from the site folder on disk before every step and saves
it after (:func:`~fedoap.federation.state.save_site_state`). Personal state never leaves it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from fedoap.algorithms import Algorithm, FitContext
from fedoap.basetypes import KV, Update
from fedoap.config import Config
from fedoap.data.dataset import ClientData
from fedoap.errors import DivergedError
from fedoap.federation import safeguard
from fedoap.federation.boundary import run_finetune_epoch, run_fit, to_device
from fedoap.federation.state import SiteState
from fedoap.metrics.selection import improves, selection_score
from fedoap.models import FedOAPNet, StateDict
from fedoap.privacy import DP_STEPS, largest_case
from fedoap.training import evaluate
from fedoap.training.device import Timer

STAGES = ("federated", "finetune", "safeguard", "test")

#: ``bar(description, total)``: a context manager yielding a per-image progress callback.
BarFactory = Callable[[str, int], contextlib.AbstractContextManager[Callable[[int], Any]]]


@contextlib.contextmanager
def _no_bar(desc: str, total: int) -> Iterator[Callable[[int], Any]]:
    yield lambda n: None


@dataclass(frozen=True)
class Step:
    """What the server asks of one site in one step (see the module docstring)."""

    round: int  # 1..R: a federated round; R+e: fine-tuning epoch e; R+F+s: safeguard step s
    stage: str  # "federated", "finetune", "safeguard" or "test"
    validate: bool = False  # first validate the global model of step ``round - 1``
    fit: bool = False  # federated: train from the global arrays and upload
    epoch: int = 0  # finetune: which epoch (1..F); safeguard: which step (1..R+F)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown step stage {self.stage!r}")

    def needs_global(self) -> bool:
        return self.validate or self.fit


@dataclass
class Reply:
    """What a site sends back for one step: validation rows (``round``, ``stage``, ``client``,
    ``val_dice``, ``val_case_dice``, ``best``, ``seconds``; the server fills ``sampled`` and the
    federated ``train_loss``), its upload, its test entry, and seconds per phase at the site."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    update: Update | None = None
    test: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    diverged: DivergedError | None = None
    refused: str | None = None  # set by a transport: the reply is malformed (why)


class Site:
    """One client's state and data, and the operations of a step."""

    def __init__(
        self,
        cfg: Config,
        alg: Algorithm,
        model: FedOAPNet,
        data: ClientData,
        record: SiteState,
        timer: Timer,
        bar: BarFactory = _no_bar,
        on_selected: Callable[[Site], None] | None = None,
    ) -> None:
        self.cfg, self.alg, self.model, self.data = cfg, alg, model, data
        self.record = record
        self.timer = timer
        self.bar = bar
        self.on_selected = on_selected  # called after the test: where the selected model goes
        # privacy.dp: the site's DP-SGD parameters, fixed (and checked) before its first step;
        # the steps it takes are counted in its state (DP_STEPS), which its checkpoint keeps.
        self.dp = (
            alg.trainer.site_dp(data.name, data.train.case_ids) if cfg.privacy.dp.enabled else None
        )
        # safeguard.mode: local's protocol for the site's local-only model (record.local).
        self.local_alg = safeguard.local_algorithm(cfg) if safeguard.enabled(cfg) else None
        # What the test scored (and on_selected saves): the selected model, or the safeguard's.
        self.final: tuple[StateDict, StateDict] | None = None

    @property
    def name(self) -> str:
        return self.data.name

    def handle(self, step: Step, global_arrays: StateDict, ft_extra: StateDict) -> Reply:
        """Run one step. A :class:`DivergedError` is returned in the reply, with the rows done
        before it; the site's state stays as it was before the failed part."""
        before = dict(self.timer.seconds)
        reply = Reply()
        try:
            if step.validate:
                rnd = step.round - 1
                reply.rows.append(self._validate(rnd, "federated", global_arrays))
            if step.fit:
                reply.update = self._fit(step.round, global_arrays)
            if step.stage == "finetune" and not self._stopped(self.record, step.round):
                reply.rows.append(self._finetune(step, ft_extra))
            if step.stage == "safeguard" and not self._stopped(self.record.local, step.epoch):
                reply.rows.append(self._safeguard_step(step))
            if step.stage == "test":
                reply.test = self._test()
        except DivergedError as err:
            reply.diverged = err
        reply.seconds = {
            k: v - before.get(k, 0.0)
            for k, v in self.timer.seconds.items()
            if v - before.get(k, 0.0) > 0
        }
        return reply

    def _stopped(self, rec: SiteState | None, rnd: int) -> bool:
        """Whether a track has stopped fine-tuning before step ``rnd`` (``finetune.patience``
        epochs without a better validation score; its fine-tuning's start counts as epoch 0).
        Federated rounds never stop."""
        patience, rounds = self.cfg.finetune.patience, self.cfg.federation.rounds
        if patience is None or rec is None or rnd <= rounds:
            return False
        return (rnd - 1) - max(rec.best_round, rounds) >= patience

    # ------------------------------------------------------------------ operations

    def _fit(self, rnd: int, global_arrays: StateDict) -> Update:
        passes = len(self.data.train) * self.alg.passes_per_round()
        with self.timer("train"), self.bar(f"round {rnd} {self.name}", passes) as progress:
            ctx = FitContext(self.name, rnd, self.cfg.seed, progress=progress)
            update, self.record.state = run_fit(
                self.alg, self.model, global_arrays, self.record.state, self.data, ctx
            )
        self._count_dp_epochs(self.alg.passes_per_round())
        return update

    def _finetune(self, step: Step, ft_extra: StateDict) -> dict[str, Any]:
        """One epoch of local fine-tuning from the best validated federated model; the model's
        weights come from the (complete) personal state, the K/V bank is the one the best model
        was selected with, and ``ft_extra`` is what the method's fine-tuning loss needs from the
        server (FedDP: the final shared weights and every site's query projection; nothing for
        the others)."""
        rec = self.record
        if step.epoch == 1:
            rec.state = self.alg.start_finetune(rec.best_weights, rec.state)
        payload = {**ft_extra, **rec.best_kv}
        with (
            self.timer("train"),
            self.bar(f"fine-tune {step.epoch} {self.name}", len(self.data.train)) as progress,
        ):
            ctx = FitContext(self.name, step.round, self.cfg.seed, progress=progress)
            loss, rec.state = run_finetune_epoch(
                self.alg, self.model, payload, rec.state, self.data, ctx, first=step.epoch == 1
            )
        self._count_dp_epochs(1)
        row = self._validate(step.round, "finetune", payload)
        row["train_loss"] = loss
        return row

    def _count_dp_epochs(self, epochs: int) -> None:
        """Add ``epochs`` of DP-SGD steps to the site's privacy ledger (``privacy.dp``)."""
        if self.dp is None:
            return
        state = self.record.state
        done = int(state.extra.get(DP_STEPS, torch.zeros((), dtype=torch.int64)))
        steps = torch.tensor(done + epochs * self.dp.steps_per_epoch, dtype=torch.int64)
        self.record.state = dataclasses.replace(state, extra={**state.extra, DP_STEPS: steps})

    def dp_report(self) -> dict[str, Any]:
        """The site's spent budget, per image and (group privacy) per case."""
        assert self.dp is not None
        return self.dp.report(self.dp_steps(), largest_case(self.data.train.case_ids))

    def dp_steps(self) -> int:
        """The DP-SGD steps this site has taken so far."""
        return int(self.record.state.extra.get(DP_STEPS, torch.zeros((), dtype=torch.int64)))

    def _safeguard_step(self, step: Step) -> dict[str, Any]:
        """One round (step <= R) or fine-tuning epoch of the site's local-only model, trained
        exactly as ``local`` trains, then validated (and kept if it is its best)."""
        assert self.local_alg is not None
        alg, rounds = self.local_alg, self.cfg.federation.rounds
        e = step.epoch
        if self.record.local is None:  # the method's network from the run's initial weights
            self.record.local = SiteState(alg.init_client(self.alg.build_model()))
        track = self.record.local
        self.model.set_kv_bank(None)  # alone: no global K/V bank
        with self.timer("safeguard"):
            ctx = FitContext(self.name, e, self.cfg.seed)
            if e <= rounds:
                update, track.state = run_fit(alg, self.model, {}, track.state, self.data, ctx)
                loss = update.metrics["train_loss"]
            else:
                if e == rounds + 1:
                    track.state = alg.start_finetune(track.best_weights, track.state)
                loss, track.state = run_finetune_epoch(
                    alg, self.model, {}, track.state, self.data, ctx, first=e == rounds + 1
                )
        row = self._validate(e, "safeguard", {}, alg=alg, record=track, phase="safeguard")
        row["train_loss"] = loss
        return row

    def _validate(
        self,
        rnd: int,
        stage: str,
        payload: StateDict,
        alg: Algorithm | None = None,
        record: SiteState | None = None,
        phase: str = "validate",
    ) -> dict[str, Any]:
        """Score the personalised model on the validation split; keep it if it is the best.
        ``alg`` and ``record``: another track than the method's (the safeguard's local model)."""
        alg = alg or self.alg
        rec, t = record or self.record, self.cfg.train
        t0 = time.perf_counter()
        with self.timer(phase):
            alg.personalize(self.model, payload, rec.state)
            val = evaluate(self.model, self.data.val, t.precision, batch_size=t.eval_batch_size)
            improved = improves(val, t.select_metric, rec.best_score)
            if improved:
                rec.best_score, rec.best_round = selection_score(val, t.select_metric), rnd
                # Kept on the CPU, in the layout it is saved in.
                rec.best_weights = to_device(
                    self.model.state_dict(), torch.device("cpu"), copy=True
                )
                rec.best_kv = {k: v.clone() for k, v in payload.items() if k.startswith(KV)}
        return {
            "round": rnd,
            "stage": stage,
            "client": self.name,
            "sampled": None,
            "train_loss": None,
            "val_dice": val["dice"],
            "val_case_dice": val["case_dice"],
            "best": int(improved),
            "seconds": time.perf_counter() - t0,
        }

    def load_best(self) -> None:
        """Put the selected model (and its K/V bank) into ``self.model``."""
        self._load(self.record.best_weights, self.record.best_kv)

    def _load(self, weights: StateDict, kv: StateDict) -> None:
        self.model.load_state_dict(weights)
        self.model.set_kv_bank(kv.get(KV + "bank"))

    def _safeguard_decision(self) -> safeguard.Decision:
        """Keep the federated model, the local one, or (interpolate) the best blend of both by
        validation; ``self.final`` is what is kept, and in ``self.model``."""
        rec, local, t = self.record, self.record.local, self.cfg.train
        mode = self.cfg.safeguard.mode
        if local is None:  # a site that was lost for the whole stage has no local model
            self.final = (rec.best_weights, rec.best_kv)
            self.load_best()
            return safeguard.Decision(
                mode, safeguard.FEDERATED, 0.0, rec.best_score, -math.inf, rec.best_score, 0
            )
        alphas = (0.0, 1.0) if mode == "choose" else self.cfg.safeguard.alphas
        scores: dict[float, float] = {}
        with self.timer("safeguard"):
            if mode == "choose":  # both were scored on validation when they were selected
                scores = {0.0: rec.best_score, 1.0: local.best_score}
            else:
                for a in sorted(set(alphas)):
                    weights = safeguard.blend(rec.best_weights, local.best_weights, a)
                    self._load(weights, rec.best_kv if a < 1 else {})
                    val = evaluate(
                        self.model, self.data.val, t.precision, batch_size=t.eval_batch_size
                    )
                    scores[a] = selection_score(val, t.select_metric)
            alpha = safeguard.best_alpha(scores)
        kv = rec.best_kv if alpha < 1 else {}
        self.final = (safeguard.blend(rec.best_weights, local.best_weights, alpha), kv)
        self._load(*self.final)
        return safeguard.Decision(
            mode=mode,
            choice=safeguard.choice_of(alpha),
            alpha=alpha,
            val_federated=rec.best_score,
            val_local=local.best_score,
            val_chosen=scores[alpha],
            local_best_round=local.best_round,
            scores={f"{a:g}": s for a, s in scores.items()} if mode == "interpolate" else None,
        )

    def _test(self) -> dict[str, Any]:
        """The client's ``summary.json`` entry: its selected model (or the one its safeguard
        kept) scored on the test split."""
        rec, t = self.record, self.cfg.train
        decision = None
        if self.local_alg is not None:
            decision = self._safeguard_decision()
        else:
            self.final = (rec.best_weights, rec.best_kv)
            self.load_best()
        with self.timer("test"):
            test = evaluate(
                self.model,
                self.data.test,
                t.precision,
                full=True,
                batch_size=t.eval_batch_size,
                cases=True,
            )
        if self.on_selected is not None:
            self.on_selected(self)
        return {
            "n": self.data.sizes(),
            "n_cases": self.data.case_counts(),
            "best_round": rec.best_round,
            "best_stage": "federated"
            if rec.best_round <= self.cfg.federation.rounds
            else "finetune",
            "val": {t.select_metric: rec.best_score},
            "test": test,
            "notes": self.data.notes,
            **({"privacy": self.dp_report()} if self.dp is not None else {}),
            **({"safeguard": decision.to_dict()} if decision is not None else {}),
        }
