"""Per-patient comparisons of a benchmark's methods, from its ``cases.csv``.

Every cell writes each client's test scores per case (``run/test_cases.csv``), and ``fedoap
bench`` gathers them into ``cases.csv``. :class:`Cases` indexes them; :func:`compare` pairs two
variants patient by patient (same patient, same seed) and gives the difference per site and on
the mean over sites, with its hierarchical-bootstrap interval (:mod:`fedoap.stats`) and the seed
t-interval; :func:`versus_local` tabulates every variant against ``local``, and
:func:`fig_data_size` draws Dice, or the gain over local, against the training patients per
site. Differences are in points of Dice (100 x); means over sites weigh sites equally.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedoap.data.errors import DataError  # noqa: E402
from fedoap.fileio import save_figure  # noqa: E402
from fedoap.stats import Interval, hierarchical_bootstrap, pair, seed_t_interval  # noqa: E402

LOCAL = "local"
FEDOAP = "fedoap"
METRIC = "case_dice"
#: A variant that selects on per-image Dice, compared with its method (which selects on case Dice).
SELECT_DICE = "-select-dice"


Obs = tuple[int, str, str, float]  # (seed, site, case, value)


def to_float(x: str | None) -> float:
    return float(x) if x not in ("", None) else math.nan


#: The per-case scores of ``cases.csv``.
CASE_SCORES = ("case_dice", "tumour_slice_dice", "empty_slice_fp_rate")


def check_score(raw: str | None, column: str, where: str) -> None:
    """Refuse a score cell that is a number but not a finite one (``inf``, ``nan``): a
    :class:`DataError` naming ``where`` (the file and line) and ``column``. An empty cell (a
    score that is undefined, such as the HD95 of an empty prediction) passes, and so does text
    (the file's reader refuses it)."""
    try:
        x = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return
    if not math.isfinite(x):
        raise DataError(
            f"{where}, column {column}: {raw!r} is not a finite score (a score is a number, "
            "or empty where it is undefined)"
        )


def load_cases(path: Path) -> list[dict[str, Any]]:
    """``cases.csv`` with its numbers parsed; errors name the file and line, and a score must
    be finite or empty (:func:`check_score`)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for i, r in enumerate(rows, start=2):
        for k in CASE_SCORES:
            check_score(r.get(k), k, f"{path}, line {i}")
        try:
            r["seed"] = int(r["seed"])
            for k in (*CASE_SCORES, "train_cases"):
                r[k] = to_float(r.get(k))
            cap = r.get("max_train_cases")
            r["max_train_cases"] = math.inf if cap in ("", None) else float(cap)
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path}, line {i}: not a fedoap cases row ({err!r})") from None
    return rows


@dataclass
class Cases:
    """``cases.csv``, indexed by (regime, variant)."""

    rows: list[dict[str, Any]]

    def __post_init__(self) -> None:
        self.by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for r in self.rows:
            self.by[(r["regime"], r["variant"])].append(r)

    def regimes(self) -> list[str]:
        """Regimes in order of their training data (data.max_train_cases; all last)."""
        size: dict[str, float] = {}
        for r in self.rows:
            size.setdefault(r["regime"], r["max_train_cases"])
        return sorted(size, key=lambda g: (size[g], g))

    def cap(self, regime: str) -> float:
        return next(r["max_train_cases"] for r in self.rows if r["regime"] == regime)

    def variants(self, regime: str, kind: str | None = None) -> list[str]:
        return list(
            dict.fromkeys(
                r["variant"]
                for r in self.rows
                if r["regime"] == regime and (kind is None or r["kind"] == kind)
            )
        )

    def scores(self, regime: str, variant: str, metric: str = METRIC) -> list[Obs]:
        return [(r["seed"], r["client"], r["case"], r[metric]) for r in self.by[(regime, variant)]]

    def sites(self, regime: str) -> list[str]:
        return list(dict.fromkeys(r["client"] for r in self.rows if r["regime"] == regime))

    def train_patients(self, regime: str, site: str) -> float:
        """The site's training patients in the regime, mean over the cells that ran it."""
        seen = {
            (r["variant"], r["seed"]): r["train_cases"]
            for r in self.rows
            if r["regime"] == regime and r["client"] == site
        }
        vals = [v for v in seen.values() if not math.isnan(v)]
        return float(np.mean(vals)) if vals else math.nan


def compare(cases: Cases, regime: str, a: str, b: str, metric: str = METRIC) -> Comparison | None:
    """``a - b`` patient by patient in one regime, on the seeds both ran (None: nothing to
    pair)."""
    diffs = pair(cases.scores(regime, a, metric), cases.scores(regime, b, metric))
    if not diffs:
        return None
    # Only seeds at which every site has pairs (a site never lacks a seed the others have).
    sites = {k for _, k, _, _ in diffs}
    per_seed: dict[int, set[str]] = defaultdict(set)
    for s, k, _, _ in diffs:
        per_seed[s].add(k)
    seeds = {s for s, ks in per_seed.items() if ks == sites}
    diffs = [d for d in diffs if d[0] in seeds]
    if not diffs:
        return None
    per_site, mean = hierarchical_bootstrap(diffs)
    by_seed: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s, k, _, d in diffs:
        by_seed[s][k].append(d)
    seed_means = [np.mean([np.mean(v) for v in ks.values()]) for ks in by_seed.values()]
    return Comparison(per_site, mean, seed_t_interval(seed_means))


@dataclass(frozen=True)
class Comparison:
    per_site: dict[str, Interval]
    mean: Interval
    seed_t: Interval  # the t-interval over seeds of the client-mean difference


def cell_text(i: Interval | None) -> str:
    return "–" if i is None else i.fmt()


def rests_on(c: Comparison) -> str:
    s, p = c.mean.seeds, c.mean.patients
    return f"{s} seed{'s' * (s != 1)}, {p} patient{'s' * (p != 1)}"


def versus_local(cases: Cases, regime: str) -> list[str]:
    """One regime's table: every variant minus local, per site and on the mean."""
    if LOCAL not in cases.variants(regime):
        return []
    sites = cases.sites(regime)
    body = []
    for v in cases.variants(regime):
        if v == LOCAL:
            continue
        c = compare(cases, regime, v, LOCAL)
        if c is None:
            continue
        body.append(
            [
                v,
                *[cell_text(c.per_site.get(k)) for k in sites],
                f"**{c.mean.fmt()}**",
                c.seed_t.fmt() if c.seed_t.seeds > 1 else "–",
                rests_on(c),
            ]
        )
    if not body:
        return []
    header = ["method − local", *sites, "mean", "seed t-interval (mean)", "rests on"]
    return [*markdown_table(header, body), ""]


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(cells) + " |" for cells in (header, *rows)]
    return [lines[0], "|" + "---|" * len(header), *lines[1:]]


def size_label(cases: Cases, regime: str) -> str:
    cap = cases.cap(regime)
    return "all" if math.isinf(cap) else f"≤ {cap:g}"


# ------------------------------------------------------------------------------ figures


def fig_data_size(cases: Cases, variants: list[str], path: Path, gain: bool) -> None:
    """Case Dice (or its gain over local) against training patients, a panel per site and one
    for the mean over sites; a line per variant with its 95% band (hierarchical bootstrap)."""
    regimes = cases.regimes()
    sites = cases.sites(regimes[0])
    panels = [*sites, "mean over sites"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), sharey=True)
    axes = np.atleast_1d(axes)
    colors = plt.get_cmap("tab10")
    shown = [v for v in variants if not (gain and v == LOCAL)]
    for i, v in enumerate(shown):
        est: dict[str, list[tuple[float, Interval]]] = defaultdict(list)
        for regime in regimes:
            if v not in cases.variants(regime):
                continue
            if gain:
                c = compare(cases, regime, v, LOCAL)
                if c is None:
                    continue
                per_site, mean = c.per_site, c.mean
            else:
                obs = [o for o in cases.scores(regime, v) if not math.isnan(o[3])]
                if not obs:
                    continue
                per_site, mean = hierarchical_bootstrap(obs)
            for k in sites:
                if k in per_site:
                    est[k].append((cases.train_patients(regime, k), per_site[k]))
            x_mean = float(np.mean([cases.train_patients(regime, k) for k in sites]))
            est["mean over sites"].append((x_mean, mean))
        for ax, panel in zip(axes, panels, strict=True):
            pts = sorted(est.get(panel, []), key=lambda p: p[0])
            if not pts:
                continue
            xs = [p[0] for p in pts]
            scale = 100 if gain else 1
            ax.plot(
                xs, [scale * p[1].mean for p in pts], marker="o", ms=3, label=v, color=colors(i)
            )
            ax.fill_between(
                xs,
                [scale * p[1].low for p in pts],
                [scale * p[1].high for p in pts],
                color=colors(i),
                alpha=0.15,
                lw=0,
            )
    for ax, panel in zip(axes, panels, strict=True):
        ax.set_title(panel, fontsize=10)
        ax.set_xscale("log", base=2)
        lo, hi = ax.get_xlim()
        ticks = [2**i for i in range(8) if lo <= 2**i <= hi]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("training patients" + (" (mean of the sites)" if panel == panels[-1] else ""))
        ax.grid(alpha=0.3)
        if gain:
            ax.axhline(0, color="k", lw=0.8)
    axes[0].set_ylabel("case Dice − local (points)" if gain else "test case Dice")
    axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle(
        ("Gain over training alone" if gain else "Test case Dice")
        + " against training patients per site (95% bands over seeds and patients)",
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
