"""Collecting a benchmark's results: every finished cell under ``OUT/cells``, whatever spec
produced it, into ``results.csv`` (one row per cell and client) and ``cases.csv`` (one row per
cell, client and test case).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Any

from fedoap.bench.planning import Cell, digest
from fedoap.config import AttackConfig, Config, load_config
from fedoap.fileio import atomic_write_text
from fedoap.metrics import CASE_FIELDS
from fedoap.runs import read_metrics

#: ``results.csv``: one row per (cell, client), from each finished cell's summaries.
RESULT_FIELDS = [
    "kind",
    "variant",
    "method",
    "seed",
    "client",
    "test_dice",
    "test_iou",
    "test_hd95_px",
    "test_case_dice",
    "best_round",
    "val_dice",
    "bytes_up_per_round",
    "bytes_down_per_round",
    "seconds_per_round",
    "seconds_total",
    "breaks_privacy",
    "config_digest",
    "val_curve",
    "device_name",
    "peak_memory_gib",
    "regime",
    "attacker",  # attack cells: 1 for a client that attacks in this cell
    "refused",  # attack cells: how many uploads the server refused over the run
    "diverged",  # attack cells: why the run stopped with a non-finite model (no scores)
    "epsilon",  # privacy.dp: the (epsilon, delta) the client spent (summary.json privacy)
    "delta",
    "dp_unit",  # privacy.dp.unit: what one unit of that (epsilon, delta) is, image or case
    "client_epsilon",  # privacy.client_dp: the run's client-level epsilon (DP-FedAvg)
    # attack cells: the config digest of the same defence without the attack. The report takes
    # the main cell as a defence's clean run only when this equals the main cell's digest.
    "clean_digest",
    "max_train_cases",  # data.max_train_cases: the cell's data-size setting (empty: all)
    "train_cases",  # the cases (patients) the client trained on
    "test_cases",  # its test cases
    "safeguard_choice",  # safeguard.mode: what the client kept (federated, local, interpolated)
    "safeguard_alpha",
    "val_federated",  # the validation scores the safeguard compared
    "val_local",
    "safeguard_seconds",  # what the cell's safeguard stage cost (all sites)
]

#: ``cases.csv``: one row per (cell, client, test case), from each cell's ``test_cases.csv``.
CASE_RESULT_FIELDS = [
    "regime",
    "kind",
    "variant",
    "method",
    "seed",
    "max_train_cases",
    "train_cases",
    "config_digest",
    *CASE_FIELDS,
]


#: An attack cell whose run stopped because the model became non-finite (an attack let in
#: without defence): an outcome to report, not a failure. Holds the run's error line.
DIVERGED = "diverged.txt"


def clean_digest(cfg: Config) -> str:
    """The digest of ``cfg`` without its attack: its defence's clean run."""
    fed = dataclasses.replace(cfg.federation, attack=AttackConfig())
    return digest(dataclasses.replace(cfg, federation=fed))


def cell_rows(cell: Cell, folder: Path) -> list[dict[str, Any]]:
    clean = clean_digest(cell.cfg) if cell.kind == "attack" else None
    if (folder / DIVERGED).is_file():  # an attack let in: no scores, the reason instead
        why = (folder / DIVERGED).read_text().strip()
        return [
            {
                "kind": cell.kind,
                "variant": cell.variant,
                "method": cell.method,
                "seed": cell.seed,
                "client": c.name,
                "config_digest": digest(cell.cfg),
                "regime": cell.regime,
                "diverged": why,
                "attacker": int(c.name in cell.cfg.federation.attack.clients),
                "clean_digest": clean,
            }
            for c in cell.cfg.data.clients
        ]
    summary = json.loads((folder / "run" / "summary.json").read_text())
    metrics = read_metrics(folder / "run" / "metrics.csv")
    execution = summary.get("execution", {})
    rows = []
    base = {
        "variant": cell.variant,
        "method": cell.method,
        "seed": cell.seed,
        "bytes_up_per_round": summary["comm"]["bytes_up_per_round"],
        "bytes_down_per_round": summary["comm"]["bytes_down_per_round"],
        "seconds_per_round": summary["time"]["seconds_per_round"],
        "seconds_total": summary["time"]["seconds_total"],
        "breaks_privacy": int(summary.get("breaks_privacy", False)),
        "config_digest": digest(cell.cfg),
        "regime": cell.regime,
        # Where the cell ran (a GPU's name, or cpu) and its peak GPU memory (empty on the CPU).
        "device_name": execution.get("name", execution.get("device", "")),
        "peak_memory_gib": execution.get("peak_memory_gib"),
        "refused": len(summary.get("refused", [])) if cell.kind == "attack" else None,
        "client_epsilon": summary.get("privacy", {}).get("client_level", {}).get("epsilon"),
        "clean_digest": clean,
        "max_train_cases": cell.cfg.data.max_train_cases,
        "safeguard_seconds": summary["time"].get("safeguard_seconds"),
    }
    spent = summary.get("privacy", {}).get("clients", {})
    if cell.kind != "loo":
        for name, c in summary["clients"].items():
            curve = [
                r["val_dice"]
                for r in metrics
                if r["client"] == name and r["stage"] in ("federated", "finetune")
            ]
            guard = c.get("safeguard", {})
            rows.append(
                {
                    **base,
                    "kind": cell.kind,
                    "client": name,
                    **{f"test_{k}": c["test"][k] for k in ("dice", "iou", "hd95_px", "case_dice")},
                    "best_round": c["best_round"],
                    "val_dice": next(iter(c["val"].values())),
                    "val_curve": ";".join(curve),
                    "attacker": int(name in cell.cfg.federation.attack.clients)
                    if cell.kind == "attack"
                    else None,
                    **{k: spent.get(name, {}).get(k) for k in ("epsilon", "delta")},
                    # Summaries from before privacy.dp.unit were per image.
                    "dp_unit": spent[name].get("unit", "image") if name in spent else None,
                    **{f"{s}_cases": c.get("n_cases", {}).get(s) for s in ("train", "test")},
                    "safeguard_choice": guard.get("choice"),
                    "safeguard_alpha": guard.get("alpha"),
                    "val_federated": guard.get("val", {}).get("federated"),
                    "val_local": guard.get("val", {}).get("local"),
                }
            )
        return rows
    adapt = json.loads((folder / "adapt" / "summary.json").read_text())
    for stage in ("zero_shot", "adapted", "local_only", "local_full"):
        t = adapt[stage]["test"]
        rows.append(
            {
                **base,
                "kind": "loo",
                "variant": f"{cell.method}:{stage}",
                "client": cell.heldout,
                **{f"test_{k}": t.get(k) for k in ("dice", "iou", "hd95_px", "case_dice")},
                "best_round": adapt[stage].get("best_epoch"),
                "val_dice": adapt[stage].get("val", {}).get("dice"),
            }
        )
    return rows


def case_rows(cell: Cell, folder: Path) -> list[dict[str, Any]]:
    """The cell's per-case test scores (``run/test_cases.csv``; none for cells that did not
    write one: leave-one-out, diverged, or run before runs wrote it), with the cell's identity
    and each client's number of training cases."""
    path = folder / "run" / "test_cases.csv"
    if cell.kind == "loo" or not path.is_file():
        return []
    summary = json.loads((folder / "run" / "summary.json").read_text())
    trained = {n: c.get("n_cases", {}).get("train") for n, c in summary["clients"].items()}
    base = {
        "regime": cell.regime,
        "kind": cell.kind,
        "variant": cell.variant,
        "method": cell.method,
        "seed": cell.seed,
        "max_train_cases": cell.cfg.data.max_train_cases,
        "config_digest": digest(cell.cfg),
    }
    return [{**base, **r, "train_cases": trained.get(r["client"])} for r in read_metrics(path)]


def finished_cells(out: Path) -> list[tuple[Cell, Path]]:
    """Every finished cell under ``out/cells`` (whatever spec produced it), with its folder."""
    found: list[tuple[Cell, Path]] = []
    for folder in sorted((out / "cells").glob("*")):
        if not (folder / "config.yaml").is_file():
            continue
        meta_path = folder / "cell.json"
        if not meta_path.is_file():
            continue
        meta = json.loads(meta_path.read_text())
        cfg = load_config(folder / "config.yaml")
        cell = Cell(
            meta["kind"],
            meta["variant"],
            meta["method"],
            meta["seed"],
            cfg,
            meta.get("heldout"),
            meta.get("regime", ""),
        )
        done = (
            (folder / "adapt" / "summary.json").is_file()
            if cell.kind == "loo"
            else (folder / "run" / "summary.json").is_file() or (folder / DIVERGED).is_file()
        )
        if done:
            found.append((cell, folder))
    return found


def collect(out: Path) -> list[dict[str, Any]]:
    """Rows of every finished cell under ``out/cells`` (whatever spec produced them)."""
    return [row for cell, folder in finished_cells(out) for row in cell_rows(cell, folder)]


def write_results(out: Path) -> Path:
    """``results.csv`` (one row per cell and client) and ``cases.csv`` (one per cell, client
    and test case) from every finished cell; returns the former."""
    cells = finished_cells(out)
    order = ("regime", "kind", "variant", "seed", "client")
    rows = [row for cell, folder in cells for row in cell_rows(cell, folder)]
    path = out / "results.csv"
    _write_csv(path, RESULT_FIELDS, sorted(rows, key=lambda r: tuple(r.get(k, "") for k in order)))
    cases = [row for cell, folder in cells for row in case_rows(cell, folder)]
    if cases:
        _write_csv(out / "cases.csv", CASE_RESULT_FIELDS, cases)
    return path


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k)) for k in fields})
    atomic_write_text(path, buf.getvalue())


#: What a cell may not start with, or a spreadsheet runs it as a formula (OWASP, CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
#: A number as ``_fmt`` writes one (also ``-0.5``, ``1e-05``, ``-inf``): never neutralised.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?|[+-]?(inf|nan)", re.IGNORECASE)


def _fmt(v: Any) -> Any:
    """A value as a CSV cell. A text cell that a spreadsheet would read as a formula (a client
    named ``=HYPERLINK(...)``) gets a leading ``'``, which makes it text; numbers, negative ones
    too, are written as they are."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, str) and v.startswith(FORMULA_START) and not _NUMBER.fullmatch(v):
        return "'" + v
    return v
