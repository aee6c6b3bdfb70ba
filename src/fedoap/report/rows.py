"""``results.csv`` read and checked, and :class:`Table`: per (variant, client) statistics over
seeds.

``results.csv`` is read as untrusted: a score must be finite (or empty), and a name that becomes
part of a file name (regime, method, variant) must be one (:func:`fedoap.fileio.safe_name`).

Statistics: for each (variant, client) the mean over seeds and a 95% confidence interval
``t_{0.975, n-1} * sd / sqrt(n)``; a variant's mean averages its clients within each seed first.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from fedoap.data.errors import DataError
from fedoap.errors import NotFoundError
from fedoap.fileio import safe_name
from fedoap.patients import check_score

#: The product's method: drawn and named first where the report compares methods.
FEDOAP = "fedoap"


@dataclass(frozen=True)
class Stat:
    mean: float
    ci: float  # half-width of the 95% CI (0 with one seed)
    n: int

    def fmt(self, digits: int = 3) -> str:
        if math.isnan(self.mean):
            return "–"
        if self.n < 2:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.ci:.{digits}f}"


def stat(values: Iterable[float]) -> Stat:
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return Stat(float("nan"), float("nan"), 0)
    if len(v) == 1:
        return Stat(float(v[0]), 0.0, 1)
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return Stat(float(v.mean()), float(half), len(v))


def points(d: Stat) -> str:
    """A paired difference in points of Dice; one seed gives no interval, and says so."""
    if d.n < 2:
        return f"{100 * d.mean:+.1f} (n = {d.n}: one seed, no interval)"
    return f"{100 * d.mean:+.1f} ± {100 * d.ci:.1f} (n = {d.n})"


def num(x: Any) -> float:
    """A results.csv field as a number; empty is NaN."""
    return float(x) if x not in ("", None) else float("nan")


#: The scores of results.csv: each a finite number, or empty where it is undefined.
SCORES = ("test_dice", "test_iou", "test_hd95_px", "test_case_dice", "val_dice")


def load_rows(path: Path) -> list[dict[str, Any]]:
    """``results.csv`` with its numbers parsed. Errors name the file and line: a row that is
    not a fedoap results row, a score that is a number but not a finite one, or a name that
    cannot be part of a file name (:func:`check_names`)."""
    if not path.is_file():
        raise NotFoundError(f"{path} not found: run fedoap bench first")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for i, r in enumerate(rows, start=2):  # line 1 is the header
        for k in SCORES:
            check_score(r.get(k), k, f"{path}, line {i}")
        try:
            for k in (
                "test_dice",
                "test_iou",
                "test_hd95_px",
                "test_case_dice",
                "val_dice",
                "bytes_up_per_round",
                "bytes_down_per_round",
                "seconds_per_round",
                "seconds_total",
                "peak_memory_gib",
                "epsilon",
                "client_epsilon",
            ):
                r[k] = num(r.get(k, ""))
            r["seed"] = int(r["seed"])
            r["regime"] = r.get("regime") or ""  # results from before regimes have none
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path}, line {i}: not a fedoap results row ({err!r})") from None
        check_names(r, f"{path}, line {i}")
    return rows


def check_names(row: dict[str, Any], where: str) -> None:
    """The row's names that name folders and files (:func:`fedoap.fileio.safe_name`): its
    regime (``figures/<regime>/``, the cell folders' prefix), its method (``robustness_<method>
    .png``) and its variant (the cell folders the image grid reads), except a leave-one-out
    row's, which is ``<method>:<stage>`` and names nothing."""
    if row["regime"]:
        safe_name(row["regime"], "regime", where)
    safe_name(row.get("method") or "", "method", where)
    if row.get("kind") != "loo":
        safe_name(row.get("variant") or "", "variant", where)


def privacy_breaking(rows: list[dict[str, Any]]) -> set[str]:
    """The variants that pool the sites' data (``breaks_privacy``), e.g. ``centralized``."""
    return {r["variant"] for r in rows if r.get("breaks_privacy") in ("1", 1, "True")}


class Table:
    """Per (variant, client) statistics over seeds for one kind of rows."""

    def __init__(
        self, rows: list[dict[str, Any]], kind: str, seeds: Iterable[int] | None = None
    ) -> None:
        keep = None if seeds is None else set(seeds)
        self.rows = [r for r in rows if r["kind"] == kind and (keep is None or r["seed"] in keep)]
        self.variants = list(dict.fromkeys(r["variant"] for r in self.rows))
        self.clients = list(dict.fromkeys(r["client"] for r in self.rows))
        self.by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for r in self.rows:
            self.by[(r["variant"], r["client"])].append(r)

    def cell(self, variant: str, client: str, key: str = "test_dice") -> Stat:
        return stat(r[key] for r in self.by[(variant, client)])

    def per_seed(self, variant: str, key: str = "test_dice") -> dict[int, float]:
        """Seed -> mean over clients, for the seeds where every client has a value."""
        per_seed: dict[int, list[float]] = defaultdict(list)
        for r in self.rows:
            if r["variant"] == variant and not math.isnan(r[key]):
                per_seed[r["seed"]].append(r[key])
        return {s: float(np.mean(v)) for s, v in per_seed.items() if len(v) == len(self.clients)}

    def mean(self, variant: str, key: str = "test_dice") -> Stat:
        return stat(self.per_seed(variant, key).values())

    def paired(self, a: str, b: str, key: str = "test_dice") -> Stat:
        """``a - b`` of the client-mean, paired by seed (same splits and initial weights)."""
        pa, pb = self.per_seed(a, key), self.per_seed(b, key)
        return stat(pa[s] - pb[s] for s in sorted(set(pa) & set(pb)))

    def seeds(self, variant: str) -> list[int]:
        return sorted({r["seed"] for r in self.rows if r["variant"] == variant})

    def worst(self, variant: str) -> tuple[str, Stat]:
        cells = {c: self.cell(variant, c) for c in self.clients}
        c = min(cells, key=lambda k: cells[k].mean)
        return c, cells[c]

    def first(self, variant: str, key: str) -> float:
        vals = [r[key] for r in self.rows if r["variant"] == variant]
        return float(np.nanmean(vals)) if vals else float("nan")


def best_baseline(t: Table, client: str | None, exclude: set[str]) -> str | None:
    """The non-FedOAP variant with the highest mean test Dice (on ``client``, or overall)."""
    cands = [v for v in t.variants if v != FEDOAP and v not in exclude]
    if not cands:
        return None
    key = (lambda v: t.cell(v, client).mean) if client else (lambda v: t.mean(v).mean)
    return max(cands, key=key)
