"""The per-patient sections of ``fedoap report``, from a benchmark's ``cases.csv``.

Every cell writes each client's test scores per case (``run/test_cases.csv``), and ``fedoap
bench`` gathers them into ``cases.csv``. From them:

* **each method against local, patient by patient**: per site and on the mean over sites, the
  paired difference in case Dice with its hierarchical-bootstrap interval over seeds and
  patients (:mod:`fedoap.stats`), what it rests on, and the seed t-interval beside it;
* **the data-size figures**, when the regimes differ in ``data.max_train_cases``: test Dice, and
  the gain over local, against the training patients per site, one line per method, with bands;
* **the safeguard** (``safeguard.mode``): what the sites kept, what it cost, and what it bought;
* **the selection metric**: a ``<method>-select-dice`` variant against its method (which selects
  on case Dice), and how many site-models predict nothing;
* **FedOAP's variants** (ablations), judged on validation only, and the goals of the study.

Differences are in points of Dice (100 x). Means over sites weigh sites equally.
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
from fedoap.stats import Interval, hierarchical_bootstrap, pair, seed_t_interval  # noqa: E402

LOCAL = "local"
FEDOAP = "fedoap"
METRIC = "case_dice"
#: A variant that selects on per-image Dice, compared with its method (which selects on case Dice).
SELECT_DICE = "-select-dice"
#: How the goals bound the safeguard's losses against local, in points of case Dice.
MEAN_BOUND, SITE_BOUND = 2.0, 5.0

Obs = tuple[int, str, str, float]  # (seed, site, case, value)


def _num(x: str | None) -> float:
    return float(x) if x not in ("", None) else math.nan


def load_cases(path: Path) -> list[dict[str, Any]]:
    """``cases.csv`` with its numbers parsed; errors name the file and line."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for i, r in enumerate(rows, start=2):
        try:
            r["seed"] = int(r["seed"])
            for k in ("case_dice", "tumour_slice_dice", "empty_slice_fp_rate", "train_cases"):
                r[k] = _num(r.get(k))
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


def _cell(i: Interval | None) -> str:
    return "–" if i is None else i.fmt()


def _rests_on(c: Comparison) -> str:
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
                *[_cell(c.per_site.get(k)) for k in sites],
                f"**{c.mean.fmt()}**",
                c.seed_t.fmt() if c.seed_t.seeds > 1 else "–",
                _rests_on(c),
            ]
        )
    if not body:
        return []
    header = ["method − local", *sites, "mean", "seed t-interval (mean)", "rests on"]
    return [*markdown_table(header, body), ""]


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(cells) + " |" for cells in (header, *rows)]
    return [lines[0], "|" + "---|" * len(header), *lines[1:]]


def _label(cases: Cases, regime: str) -> str:
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ sections


def _results_by(results: list[dict[str, Any]], regime: str, variant: str) -> list[dict[str, Any]]:
    return [r for r in results if r["regime"] == regime and r["variant"] == variant]


def safeguard_section(cases: Cases, results: list[dict[str, Any]]) -> list[str]:
    """What the safeguard's sites kept, what it cost, and what it bought, regime by regime."""
    guarded = sorted({r["variant"] for r in results if r.get("safeguard_choice")})
    if not guarded:
        return []
    out = [
        "## The safeguard",
        "",
        "Each site also trains a local-only model (the method's network on its own data, with "
        "`local`'s protocol and budget) and keeps, by validation, the federated model, the local "
        "one or a blend of the two (`safeguard.mode`). Kept: over seeds x sites. Cost: the "
        "safeguard stage's seconds (all sites) against the cell's wall time. The differences "
        "are per patient, in case-Dice points, with their 95% intervals. Goal: no setting's "
        f"mean more than {MEAN_BOUND:g} points below local, and no site more than "
        f"{SITE_BOUND:g} points below.",
        "",
    ]
    header = [
        "regime",
        "variant",
        "kept federated / local / blend",
        "mean alpha",
        "extra cost",
        "− its method",
        "− local (mean)",
        "worst site − local",
        "goal",
    ]
    body = []
    for regime in cases.regimes():
        for v in guarded:
            mine = _results_by(results, regime, v)
            if not mine:
                continue
            method = mine[0]["method"]
            kept = [r["safeguard_choice"] for r in mine]
            alphas = [_num(r.get("safeguard_alpha")) for r in mine]
            cells = {(r["seed"], r["config_digest"]): r for r in mine}
            cost = [
                _num(r.get("safeguard_seconds")) / r["seconds_total"]
                for r in cells.values()
                if r["seconds_total"]
            ]
            own = compare(cases, regime, v, method)
            vs_local = compare(cases, regime, v, LOCAL)
            worst, verdict = "–", "–"
            if vs_local is not None:
                site, w = min(vs_local.per_site.items(), key=lambda kv: kv[1].mean)
                worst = f"{site} {100 * w.mean:+.1f}"
                ok = 100 * vs_local.mean.mean >= -MEAN_BOUND and 100 * w.mean >= -SITE_BOUND
                verdict = "met" if ok else "not met"
            body.append(
                [
                    _label(cases, regime),
                    v,
                    " / ".join(str(kept.count(c)) for c in ("federated", "local", "interpolated")),
                    f"{np.nanmean(alphas):.2f}",
                    f"{100 * np.nanmean(cost):.0f}% of the cell" if cost else "–",
                    _cell(own.mean if own else None),
                    _cell(vs_local.mean if vs_local else None),
                    worst,
                    verdict,
                ]
            )
    return [*out, *markdown_table(header, body), ""]


def _predicts_nothing(rows: list[dict[str, Any]]) -> bool:
    """A site-model with no positive pixel on its whole test split."""
    tumour = [r for r in rows if not math.isnan(r["tumour_slice_dice"])]
    empty = [r for r in rows if not math.isnan(r["empty_slice_fp_rate"])]
    return all(r["tumour_slice_dice"] == 0 for r in tumour) and all(
        r["empty_slice_fp_rate"] == 0 for r in empty
    )


def empty_models(cases: Cases, regime: str, variant: str) -> tuple[int, int]:
    """(site-models that predict nothing on their test split, site-models)."""
    per: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for r in cases.by[(regime, variant)]:
        per[(r["seed"], r["client"])].append(r)
    return sum(_predicts_nothing(v) for v in per.values()), len(per)


def selection_section(cases: Cases, results: list[dict[str, Any]]) -> list[str]:
    """``<method>-select-dice`` (selection on per-image Dice) against ``<method>`` (on case
    Dice): per patient, per image, and the empty predictors each selects."""
    body = []
    for regime in cases.regimes():
        for v in cases.variants(regime):
            if not v.endswith(SELECT_DICE):
                continue
            base = v.removesuffix(SELECT_DICE)
            c = compare(cases, regime, v, base)
            if c is None:
                continue
            image = _seed_paired(results, regime, v, base, "test_dice")
            e_v, n_v = empty_models(cases, regime, v)
            e_b, n_b = empty_models(cases, regime, base)
            body.append(
                [
                    _label(cases, regime),
                    base,
                    c.mean.fmt(),
                    image.fmt() if image.seeds > 1 else "–",
                    f"{e_v} of {n_v}",
                    f"{e_b} of {n_b}",
                    _rests_on(c),
                ]
            )
    if not body:
        return []
    header = [
        "regime",
        "method",
        "case Dice: image − case selection",
        "image Dice: image − case selection (seed t)",
        "predict nothing (image selection)",
        "predict nothing (case selection)",
        "rests on",
    ]
    return [
        "## Which validation metric selects the model",
        "",
        "Each method selects its model per site on validation. `-select-dice` selects on "
        "per-image Dice, which scores every tumour-free slice predicted empty as 1; the others "
        "select on case Dice, where an empty prediction on a patient with tumour scores 0. "
        "Differences in points, per patient (case Dice) and per seed (image Dice). A site-model "
        "that predicts nothing has no positive pixel on its whole test split.",
        "",
        *markdown_table(header, body),
        "",
    ]


def _seed_paired(results: list[dict[str, Any]], regime: str, a: str, b: str, key: str) -> Interval:
    """``a - b`` of the client-mean ``key``, paired by seed (results.csv)."""

    def per_seed(v: str) -> dict[int, float]:
        by: dict[int, list[float]] = defaultdict(list)
        for r in _results_by(results, regime, v):
            by[r["seed"]].append(r[key])
        return {s: float(np.mean(x)) for s, x in by.items()}

    pa, pb = per_seed(a), per_seed(b)
    return seed_t_interval([pa[s] - pb[s] for s in sorted(set(pa) & set(pb))])


def _validation(results: list[dict[str, Any]], regime: str, variant: str) -> dict[int, float]:
    """Seed -> the client-mean validation score of the models the variant selected."""
    by: dict[int, list[float]] = defaultdict(list)
    for r in _results_by(results, regime, variant):
        by[r["seed"]].append(r["val_dice"])
    return {s: float(np.mean(v)) for s, v in by.items()}


def variants_section(cases: Cases, results: list[dict[str, Any]]) -> tuple[list[str], dict]:
    """FedOAP's variants (ablations) against FedOAP, on validation (which decides) and on the
    test patients (which only reports). Returns the lines and, per regime, the best FedOAP
    variant by validation."""
    best: dict[str, str] = {}
    body = []
    for regime in cases.regimes():
        candidates = [FEDOAP] + [
            v for v in cases.variants(regime, "ablation") if v.startswith(FEDOAP + "-")
        ]
        if FEDOAP not in cases.variants(regime) or len(candidates) == 1:
            continue
        ref = _validation(results, regime, FEDOAP)
        mean_val = {}
        for v in candidates:
            mine = _validation(results, regime, v)
            seeds = sorted(set(mine) & set(ref))
            mean_val[v] = float(np.mean([mine[s] for s in seeds])) if seeds else math.nan
            if v == FEDOAP:
                continue
            val = seed_t_interval([mine[s] - ref[s] for s in seeds])
            test = compare(cases, regime, v, FEDOAP)
            body.append(
                [
                    _label(cases, regime),
                    v,
                    val.fmt() if val.seeds > 1 else "–",
                    "kept" if val.mean > 0 else "dropped",
                    _cell(test.mean if test else None),
                    _rests_on(test) if test else "–",
                ]
            )
        best[regime] = max(
            (v for v in candidates if not math.isnan(mean_val[v])),
            key=lambda v: mean_val[v],
            default=FEDOAP,
        )
    if not body:
        return [], best
    header = [
        "regime",
        "variant",
        "validation − fedoap (seed t)",
        "by validation",
        "test case Dice − fedoap",
        "rests on",
    ]
    return [
        "## FedOAP where data is scarce: its variants",
        "",
        "Each variant changes one thing in FedOAP. It is kept when its mean validation score "
        "(case Dice of the selected models, mean over sites, paired by seed) is above "
        "FedOAP's; the test column only reports. A variant with more fine-tuning epochs "
        "selects among more models, which lifts its validation score a little by itself.",
        "",
        *markdown_table(header, body),
        "",
    ], best


def goals_section(cases: Cases, results: list[dict[str, Any]], best: dict[str, str]) -> list[str]:
    """The study's goals at its scarcest setting."""
    regimes = cases.regimes()
    if not regimes or LOCAL not in cases.variants(regimes[0]):
        return []
    scarce = regimes[0]
    lines = ["## The goals, measured", ""]
    variant = best.get(scarce, FEDOAP)
    c = compare(cases, scarce, variant, LOCAL)
    if c is not None:
        verdict = "met" if c.mean.low > 0 else "not met"
        lines.append(
            f"- At the scarcest setting ({_label(cases, scarce)} training patients per site), "
            f"the best FedOAP variant by validation (`{variant}`) beats local with a "
            f"per-patient interval that excludes 0: **{verdict}** ({c.mean.fmt()} points of "
            f"case Dice; {_rests_on(c)})."
        )
    guarded = sorted({r["variant"] for r in results if r.get("safeguard_choice")})
    for v in guarded:
        worst_mean, worst_site = math.inf, (math.inf, "", "")
        for regime in regimes:
            d = compare(cases, regime, v, LOCAL)
            if d is None:
                continue
            worst_mean = min(worst_mean, 100 * d.mean.mean)
            for site, i in d.per_site.items():
                if 100 * i.mean < worst_site[0]:
                    worst_site = (100 * i.mean, site, _label(cases, regime))
        if math.isinf(worst_mean):
            continue
        ok = "met" if worst_mean >= -MEAN_BOUND and worst_site[0] >= -SITE_BOUND else "not met"
        lines.append(
            f"- With the safeguard (`{v}`), no setting's mean more than {MEAN_BOUND:g} points "
            f"below local and no site more than {SITE_BOUND:g} below: **{ok}** "
            f"(worst mean {worst_mean:+.1f}; worst site {worst_site[1]} at "
            f"{worst_site[2]} patients, {worst_site[0]:+.1f})."
        )
    return [*lines, ""]


def patient_sections(results_dir: Path, results: list[dict[str, Any]], figs: Path) -> list[str]:
    """Everything above, when ``cases.csv`` exists (empty otherwise)."""
    path = results_dir / "cases.csv"
    if not path.is_file():
        return []
    cases = Cases(load_cases(path))
    if not cases.rows:
        return []
    lines = [
        "# Per patient",
        "",
        "Each test patient's case Dice (its slices' pixels pooled) under each method, paired "
        "with local's on the same patient at the same seed. Intervals: 95%, hierarchical "
        "bootstrap over seeds and then patients within each site (`fedoap.stats`); the mean "
        "weighs sites equally. `rests on` counts seeds and test patients (with the split "
        "following the seed, a patient is counted at each seed it was tested at). The seed "
        "t-interval of the client-mean difference stands beside it.",
        "",
    ]
    for regime in cases.regimes():
        table = versus_local(cases, regime)
        if table:
            lines += [f"### {regime}: each method − local (case-Dice points)", "", *table]
    regimes = cases.regimes()
    sizes = {cases.cap(g) for g in regimes}
    if len(sizes) > 1 and all(LOCAL in cases.variants(g) for g in regimes):
        main = [v for v in cases.variants(regimes[-1], "main") if not v.endswith(SELECT_DICE)]
        figs.mkdir(parents=True, exist_ok=True)
        fig_data_size(cases, main, figs / "data_size_dice.png", gain=False)
        fig_data_size(cases, main, figs / "data_size_gain.png", gain=True)
        rel = figs.name
        lines += [
            "### Against the training patients per site",
            "",
            f"![Dice against training patients]({rel}/data_size_dice.png)",
            "",
            f"![Gain over local against training patients]({rel}/data_size_gain.png)",
            "",
        ]
    lines += safeguard_section(cases, results)
    lines += selection_section(cases, results)
    section, best = variants_section(cases, results)
    lines += section
    lines += goals_section(cases, results, best)
    return lines
