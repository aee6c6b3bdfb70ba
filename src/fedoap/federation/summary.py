"""``summary.json``: one structure for every runtime (in-process runner, Flower)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedoap.algorithms import Algorithm
from fedoap.basetypes import StateDict
from fedoap.config import Config
from fedoap.federation import safeguard
from fedoap.metrics import CASE_FIELDS
from fedoap.models import FedOAPNet
from fedoap.privacy import privacy_summary


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def make_summary(
    cfg: Config,
    alg: Algorithm,
    model: FedOAPNet,
    clients: dict[str, Any],
    bytes_up: list[int],
    bytes_down: list[int],
    kv_bank_bytes: int,
    elapsed: float,
    round_seconds: list[float],
    finetune_epochs: int,
    execution: dict[str, Any] | None = None,
    phases: dict[str, float] | None = None,
) -> dict[str, Any]:
    """``clients[name]`` holds n, best_round, best_stage, val and test (dice, iou, hd95_px,
    case_dice, ...). Byte lists have one entry per (round, client that sent/received).
    ``execution`` describes where the run executed (device, precision, compilation);
    ``phases`` splits its wall time (data, compile, train, aggregate, validate, checkpoint,
    test)."""
    counts = alg.partition(model).count(model)
    return {
        "method": alg.name,
        "breaks_privacy": alg.breaks_privacy,
        "seed": cfg.seed,
        "config_digest": cfg.digest(),
        "clients": clients,
        "mean": {
            "test": {
                k: _mean([c["test"][k] for c in clients.values()])
                for k in ("dice", "iou", "hd95_px", "case_dice")
            }
        },
        "worst": {"test": {"dice": min(c["test"]["dice"] for c in clients.values())}},
        "params": {**counts, "total": counts["shared"] + counts["personal"]},
        "flops_per_image": model.flops_per_image(cfg.data.image_size),
        "comm": {
            # Per client per round, of what actually travels (raw tensor bytes).
            "bytes_up_per_round": int(np.mean(bytes_up)) if bytes_up else 0,
            "bytes_down_per_round": int(np.mean(bytes_down)) if bytes_down else 0,
            "bytes_total": int(sum(bytes_up) + sum(bytes_down)),
            "kv_bank_bytes": int(kv_bank_bytes),
        },
        "time": {
            "seconds_total": round(elapsed, 2),
            "seconds_per_round": round(float(np.mean(round_seconds)), 3) if round_seconds else None,
            "rounds": cfg.federation.rounds,
            "finetune_epochs": finetune_epochs,
            "clients": len(clients),
            **({"phases": {k: round(v, 3) for k, v in phases.items()}} if phases else {}),
        },
        **({"execution": execution} if execution else {}),
    }


def add_outcomes(
    summary: dict[str, Any],
    cfg: Config,
    server_state: StateDict,
    events: dict[str, list[Any] | dict[str, Any]],
    site_seconds: dict[str, float],
) -> None:
    """Add what happened beyond the scores: the privacy spent (each site's budget, in one
    place), the sites excluded, the uploads refused and the sites lost (``events``, where any),
    and what the safeguard kept and cost (summed over the sites, on either transport)."""
    clients = summary["clients"]
    privacy = privacy_summary(cfg, clients, server_state)
    if privacy is not None:
        summary["privacy"] = privacy
        for entry in clients.values():
            entry.pop("privacy", None)
    for key, happened in events.items():
        if happened:
            summary[key] = happened
    if safeguard.enabled(cfg):
        chosen = [e["safeguard"]["choice"] for e in clients.values() if "safeguard" in e]
        summary["safeguard"] = {
            "mode": cfg.safeguard.mode,
            "kept": {c: chosen.count(c) for c in safeguard.CHOICES},
        }
        summary["time"]["safeguard_seconds"] = round(site_seconds.get("safeguard", 0), 3)


def take_case_rows(tests: dict[str, Any]) -> list[dict[str, Any]]:
    """Each site's per-case test scores (its test entry's ``test.cases``), taken out of the
    entry: they go to ``test_cases.csv``, not ``summary.json``."""
    rows: list[dict[str, Any]] = []
    for name, entry in tests.items():
        cases = entry["test"].pop("cases", None)
        for case in cases if isinstance(cases, list) else []:
            if isinstance(case, dict):  # a site's own fields; the client is the sender
                rows.append({**{k: v for k, v in case.items() if k in CASE_FIELDS}, "client": name})
    return rows
