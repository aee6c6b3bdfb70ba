"""Adapting a finished federation to a hospital that was never part of it.

``fedoap adapt RUN_DIR --data NEW --name NAME [--epochs F] [--parts personal|all] [--init
averaged|fresh|nearest] -o OUT``:

1. splits the new client's data by case, with the run's data settings;
2. **zero-shot**: the federation's final shared weights (and K/V bank), with personal parts
   *averaged* over the federation's clients' selected models, *freshly* initialised, or taken
   from the *nearest* federation client: the one whose personal parts score best on the new
   client's validation split (no training; it does use the new site's validation labels, as
   any model selection there must);
3. **adapted**: fine-tunes the chosen parts for F epochs with the method's fine-tuning loss
   (PBL for FedOAP), selecting the epoch (0 = zero-shot) on the new client's validation split;
4. **local_only**: a model trained from scratch on the same split for the same F epochs;
   **local_full**: the same from scratch with a federation client's whole budget
   (rounds x local epochs + fine-tuning epochs), the stricter bar.

Every model's test score is read once, at the end. ``OUT/summary.json`` holds
``zero_shot.test.dice``, ``adapted.test.dice``, ``local_only.test.dice`` and
``local_full.test.dice`` with HD95, IoU and case Dice.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedoap.algorithms import FitContext, build_algorithm
from fedoap.api import run_config
from fedoap.basetypes import KV, SHARED, ClientState
from fedoap.config import ClientSpec, Config, ConfigError
from fedoap.data.dataset import ClientData, make_client
from fedoap.errors import NotFoundError
from fedoap.federation.boundary import run_finetune_epoch, run_fit
from fedoap.federation.state import load_run_state
from fedoap.fileio import SAFE_NAME, SAFE_NAME_RULE, check_output_dir
from fedoap.metrics.selection import improves, selection_score
from fedoap.models import StateDict
from fedoap.models.partition import sub
from fedoap.runs import RunDir
from fedoap.training import evaluate
from fedoap.training.device import oom_guard, place, session

INITS = ("averaged", "fresh", "nearest")
#: Most fine-tuning epochs ``--epochs`` takes (as ``finetune.epochs``).
MAX_ADAPT_EPOCHS = 100_000

logger = logging.getLogger(__name__)


def new_client_data(cfg: Config, path: Path, name: str) -> ClientData:
    """The new site's data: an npz, a folder of image/mask pairs, or an nnU-Net or Decathlon
    dataset folder (by its dataset.json; single-channel, every non-zero label tumour)."""
    from fedoap.data.volumes import detect_layout

    source = "npz" if path.suffix == ".npz" else (detect_layout(path) or "folder")
    spec = ClientSpec(name=name, source=source, path=str(path.resolve()))  # type: ignore[arg-type]
    return make_client(spec, cfg.data)


def _mean_states(states: list[StateDict]) -> StateDict:
    out = {}
    for k in states[0]:
        stacked = torch.stack([s[k] for s in states])
        out[k] = (
            stacked.double().mean(0).to(stacked.dtype)
            if stacked.is_floating_point()
            else stacked[0]
        )
    return out


def _select(
    train_epoch: Callable[[int], None],
    score: Callable[[], dict[str, Any]],
    snapshot: Callable[[], StateDict],
    epochs: int,
    metric: str,
    include_start: bool,
) -> tuple[int, dict[str, Any], StateDict]:
    """Train ``epochs`` epochs, validating after each; returns (best epoch, its val, weights),
    by the one selection rule (:mod:`fedoap.metrics.selection`)."""
    best: tuple[int, dict[str, Any], StateDict] | None = None
    if include_start:
        val = score()
        best = (0, val, snapshot())
    for e in range(1, epochs + 1):
        train_epoch(e)
        val = score()
        if best is None or improves(val, metric, selection_score(best[1], metric)):
            best = (e, val, snapshot())
    assert best is not None
    return best


def adapt(
    run_dir: Path,
    data_path: Path,
    name: str,
    epochs: int = 2,
    parts: str = "all",
    init: str = "averaged",
    device: str | None = None,
) -> dict[str, Any]:
    """Steps 1-4 of the module docstring; returns what ``OUT/summary.json`` holds.

    Runs with the federation's ``train.num_threads`` (then restores the process's count): float
    reductions depend on the thread count, so the same adaptation on another count trains a
    slightly different model.
    """
    _check_options(name, epochs, parts, init)
    rd = RunDir(run_dir)
    if not rd.summary.is_file():
        raise NotFoundError(f"{rd.summary} not found: adapt needs a finished run")
    cfg = run_config(run_dir, device)
    with session(cfg.train) as dev, oom_guard(cfg.train, cfg.data.image_size, dev):
        return _adapt(rd, cfg, data_path, name, epochs, parts, init, dev)


def _check_options(name: str, epochs: int, parts: str, init: str) -> None:
    """The command's own options, before the run or the data is read."""
    if SAFE_NAME.fullmatch(name) is None:
        raise ConfigError(f"--name: {name[:64]!r} is not a usable client name ({SAFE_NAME_RULE})")
    if not 1 <= epochs <= MAX_ADAPT_EPOCHS:
        raise ConfigError(f"--epochs must be between 1 and {MAX_ADAPT_EPOCHS:,}, got {epochs}")
    if parts not in ("all", "personal"):
        raise ConfigError(f"--parts must be 'all' or 'personal', got {parts!r}")
    if init not in INITS:
        raise ConfigError(f"--init must be one of {', '.join(INITS)}, got {init!r}")


def _adapt(
    rd: RunDir,
    cfg: Config,
    data_path: Path,
    name: str,
    epochs: int,
    parts: str,
    init: str,
    device: torch.device,
) -> dict[str, Any]:
    cfg = dataclasses.replace(
        cfg, finetune=dataclasses.replace(cfg.finetune, epochs=epochs, parts=parts)
    )
    if name in [c.name for c in cfg.data.clients]:
        raise ConfigError(f"client {name!r} was part of the federation in {rd.config}")
    data = new_client_data(cfg, data_path, name).to(device)
    alg = build_algorithm(cfg)
    model = alg.build_model()
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    place(model, cfg.train, device)
    rs = load_run_state(rd)
    global_arrays = rs.global_arrays
    payload = {**global_arrays, **rs.ft_extra}
    personal_keys = set(alg.partition(model).personal)
    shared = sub(global_arrays, SHARED)
    metric = cfg.train.select_metric
    precision = cfg.train.precision
    eval_bs = cfg.train.eval_batch_size

    def load(weights: StateDict) -> None:
        model.load_state_dict(weights)
        model.set_kv_bank(payload.get(KV + "bank"))

    # Each federation client's validation-selected personal parts, by client name.
    donors = {
        c.name: {
            k: v
            for k, v in (rs.sites[c.name].best_weights if c.name in rs.sites else {}).items()
            if k in personal_keys
        }
        for c in cfg.data.clients
    }
    missing = [c for c, parts_c in donors.items() if personal_keys - set(parts_c)]
    if personal_keys and init in ("averaged", "nearest") and missing:
        # A Flower run: personal parts never leave the sites, so the server's checkpoint has no
        # client models to average or choose from. Refuse rather than start them fresh while
        # reporting another init.
        raise ConfigError(
            f"--init {init} needs each federation client's selected personal parts, and "
            f"{rd.last} holds none for {missing}"
            + (
                " (a Flower run: personal parts stay at the sites and the server holds only the "
                "global weights)"
                if rs.runtime == "flower"
                else ""
            )
            + "; use --init fresh"
        )
    donor_val: dict[str, float] = {}
    if init == "averaged" and personal_keys:
        personal = _mean_states(list(donors.values()))
    elif init == "nearest" and personal_keys:
        for c, parts_c in donors.items():
            load({**fresh, **shared, **parts_c})
            donor_val[c] = float(evaluate(model, data.val, precision, batch_size=eval_bs)[metric])
        nearest = max(donor_val, key=lambda c: donor_val[c])
        logger.info(
            f"nearest federation client on {name}'s validation split: {nearest} ({donor_val})"
        )
        personal = donors[nearest]
    else:
        personal = {k: fresh[k] for k in personal_keys}
    start = {**fresh, **shared, **personal}

    # 1-2. zero-shot and adapted (epoch 0 = zero-shot is a candidate for selection)
    load(start)
    zero_val = evaluate(model, data.val, precision, batch_size=eval_bs)
    state = ClientState(personal=dict(start))
    holder = {"state": state}

    def ft_epoch(e: int) -> None:
        ctx = FitContext(name, e, cfg.seed)
        _, holder["state"] = run_finetune_epoch(
            alg, model, payload, holder["state"], data, ctx, first=e == 1
        )

    def snap() -> StateDict:
        return {k: v.clone() for k, v in model.state_dict().items()}

    load(start)
    best_e, best_val, best_w = _select(
        ft_epoch,
        lambda: evaluate(model, data.val, precision, batch_size=eval_bs),
        snap,
        epochs,
        metric,
        True,
    )
    logger.info(f"adapted: best epoch {best_e} of {epochs} (val {metric} {best_val[metric]:.3f})")

    # 3. local baselines from scratch, same split
    local_cfg = dataclasses.replace(
        cfg, method="local", train=dataclasses.replace(cfg.train, local_epochs=1)
    )
    local_alg = build_algorithm(local_cfg)
    # One local model (compiled once), reset to its initial weights for each baseline.
    scratch = local_alg.build_model()
    scratch_init = local_alg.init_client(scratch)
    place(scratch, cfg.train, device)

    def from_scratch(n_epochs: int) -> tuple[int, dict[str, Any], StateDict]:
        m = scratch
        st = {"state": scratch_init}

        def epoch(e: int) -> None:
            _, st["state"] = run_fit(
                local_alg, m, {}, st["state"], data, FitContext(name, e, cfg.seed)
            )

        m.load_state_dict(scratch_init.personal)
        return _select(
            epoch,
            lambda: evaluate(m, data.val, precision, batch_size=eval_bs),
            lambda: {k: v.clone() for k, v in m.state_dict().items()},
            n_epochs,
            metric,
            False,
        )

    full_budget = cfg.federation.rounds * cfg.train.local_epochs + epochs
    local_only = from_scratch(epochs)
    local_full = from_scratch(full_budget)

    # 4. test, once per model
    def test(weights: StateDict, m: torch.nn.Module, bank: bool) -> dict[str, Any]:
        m.load_state_dict(weights)
        if bank:
            model.set_kv_bank(payload.get(KV + "bank"))
        return evaluate(m, data.test, precision, full=True, batch_size=eval_bs)

    summary = {
        "run": str(rd.root),
        "method": cfg.method,
        "client": name,
        "data": str(data_path),
        "init": init,
        # init=nearest: each federation client's personal parts scored on the new client's
        # validation split, and the one used.
        "init_val": donor_val,
        "init_from": (
            max(donor_val, key=lambda c: donor_val[c])
            if donor_val
            else (init if personal_keys else "no personal parts")
        ),
        "parts": parts,
        "epochs": epochs,
        "n": data.sizes(),
        "zero_shot": {"val": zero_val, "test": test(start, model, True)},
        "adapted": {"best_epoch": best_e, "val": best_val, "test": test(best_w, model, True)},
        "local_only": {
            "epochs": epochs,
            "best_epoch": local_only[0],
            "val": local_only[1],
            "test": test(local_only[2], scratch, False),
        },
        "local_full": {
            "epochs": full_budget,
            "best_epoch": local_full[0],
            "val": local_full[1],
            "test": test(local_full[2], scratch, False),
        },
    }
    return summary


def write_adapt(summary: dict[str, Any], out: Path, force: bool) -> None:
    check_output_dir(out)  # the command checks first too, before any training
    rd = RunDir(out)
    with rd.lock(create=True):
        rd.prepare(force=force)
        rd.write_json(rd.summary, summary)
