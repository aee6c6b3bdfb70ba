"""The per-patient part of ``fedoap report`` (:mod:`fedoap.patients` does the comparing).

When a results folder has ``cases.csv``:

* **each method against local, patient by patient**: per site and on the mean over sites, with
  what each interval rests on and the seed t-interval beside it;
* **the data-size figures**, when the regimes differ in ``data.max_train_cases``;
* **the safeguard** (``safeguard.mode``): what the sites kept, what it cost, what it bought;
* **the selection metric**: a ``<method>-select-dice`` variant against its method (which selects
  on case Dice), and how many site-models predict nothing;
* **FedOAP's variants** (ablations), judged on validation only.

A study's goals come from its :class:`~fedoap.report.analysis.Analysis`: a ``goal`` column in
the safeguard table and its own lines at the end. Scores are checked as they are read
(:func:`fedoap.patients.check_score`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fedoap.patients import (
    FEDOAP,
    LOCAL,
    SELECT_DICE,
    Cases,
    cell_text,
    compare,
    fig_data_size,
    load_cases,
    markdown_table,
    rests_on,
    size_label,
    to_float,
    versus_local,
)
from fedoap.report.analysis import NO_ANALYSIS, Analysis
from fedoap.report.markdown import md
from fedoap.stats import Interval, seed_t_interval


def _results_by(results: list[dict[str, Any]], regime: str, variant: str) -> list[dict[str, Any]]:
    return [r for r in results if r["regime"] == regime and r["variant"] == variant]


def safeguard_section(
    cases: Cases, results: list[dict[str, Any]], analysis: Analysis = NO_ANALYSIS
) -> list[str]:
    """What the safeguard's sites kept, what it cost, and what it bought, regime by regime; with
    a ``goal`` column where ``analysis`` states one (:meth:`Analysis.safeguard_goal`)."""
    guarded = sorted({r["variant"] for r in results if r.get("safeguard_choice")})
    if not guarded:
        return []
    goal = analysis.safeguard_goal()
    intro = (
        "Each site also trains a local-only model (the method's network on its own data, with "
        "`local`'s protocol and budget) and keeps, by validation, the federated model, the local "
        "one or a blend of the two (`safeguard.mode`). Kept: over seeds x sites. Extra cost: "
        "the safeguard stage's seconds (all sites) against the rest of the cell's wall time, in "
        "one process. The differences "
        "are per patient, in case-Dice points, with their 95% intervals."
    )
    out = ["## The safeguard", "", intro + (f" {goal}" if goal else ""), ""]
    header = [
        "regime",
        "variant",
        "kept federated / local / blend",
        "mean alpha",
        "extra cost",
        "− its method",
        "− local (mean)",
        "worst site − local",
        *(["goal"] if goal else []),
    ]
    body = []
    for regime in cases.regimes():
        for v in guarded:
            mine = _results_by(results, regime, v)
            if not mine:
                continue
            method = mine[0]["method"]
            kept = [r["safeguard_choice"] for r in mine]
            alphas = [to_float(r.get("safeguard_alpha")) for r in mine]
            cells = {(r["seed"], r["config_digest"]): r for r in mine}
            # The stage's seconds against the rest of the cell's wall time (the method's run).
            cost = [
                sg / (r["seconds_total"] - sg)
                for r in cells.values()
                if (sg := to_float(r.get("safeguard_seconds"))) < r["seconds_total"]
            ]
            own = compare(cases, regime, v, method)
            vs_local = compare(cases, regime, v, LOCAL)
            worst, verdict = "–", "–"
            if vs_local is not None:
                site, w = min(vs_local.per_site.items(), key=lambda kv: kv[1].mean)
                worst = f"{md(site)} {100 * w.mean:+.1f}"
                verdict = analysis.safeguard_verdict(vs_local)
            body.append(
                [
                    size_label(cases, regime),
                    md(v),
                    " / ".join(str(kept.count(c)) for c in ("federated", "local", "interpolated")),
                    f"{np.nanmean(alphas):.2f}",
                    f"+{100 * np.nanmean(cost):.0f}% wall time" if cost else "–",
                    cell_text(own.mean if own else None),
                    cell_text(vs_local.mean if vs_local else None),
                    worst,
                    *([verdict] if goal else []),
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


def false_positive_rate(cases: Cases, regime: str, variant: str) -> float:
    """The share of tumour-free test slices with a predicted pixel, over every patient that has
    such slices (a patient's rate weighted by its tumour-free slices)."""
    rows = [r for r in cases.by[(regime, variant)] if not math.isnan(r["empty_slice_fp_rate"])]
    empty = [int(r["slices"]) - int(r["tumour_slices"]) for r in rows]
    hits = sum(r["empty_slice_fp_rate"] * n for r, n in zip(rows, empty, strict=True))
    return hits / sum(empty) if sum(empty) else math.nan


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
            fp_v, fp_b = (false_positive_rate(cases, regime, x) for x in (v, base))
            body.append(
                [
                    size_label(cases, regime),
                    md(base),
                    c.mean.fmt(),
                    image.fmt() if image.seeds > 1 else "–",
                    f"{100 * fp_v:.0f}% / {100 * fp_b:.0f}%",
                    f"{e_v} of {n_v} / {e_b} of {n_b}",
                    rests_on(c),
                ]
            )
    if not body:
        return []
    header = [
        "regime",
        "method",
        "case Dice: image − case selection",
        "image Dice: image − case selection (seed t)",
        "tumour-free slices with a false positive: image / case selection",
        "site-models that predict nothing: image / case selection",
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
                    size_label(cases, regime),
                    md(v),
                    val.fmt() if val.seeds > 1 else "–",
                    "kept" if val.mean > 0 else "dropped",
                    cell_text(test.mean if test else None),
                    rests_on(test) if test else "–",
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


def read_cases(results_dir: Path) -> Cases | None:
    """``results_dir/cases.csv`` (None without one), with every score finite or empty."""
    path = results_dir / "cases.csv"
    return Cases(load_cases(path)) if path.is_file() else None


def _shown(cases: Cases) -> Cases:
    """``cases`` with its variants and sites as :func:`md` writes them, for the tables that
    :mod:`fedoap.patients` writes (md keeps distinct names distinct, and ordinary ones as they
    are, so the comparisons are the same)."""
    shown = [{**r, "variant": md(r["variant"]), "client": md(r["client"])} for r in cases.rows]
    return Cases(shown)


def patient_sections(
    cases: Cases | None,
    results: list[dict[str, Any]],
    figs: Path,
    analysis: Analysis = NO_ANALYSIS,
) -> list[str]:
    """Everything above, from :func:`read_cases` (empty without cases), then ``analysis``'s
    own lines (:meth:`Analysis.patients`)."""
    if cases is None or not cases.rows:
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
    shown = _shown(cases)
    for regime in cases.regimes():
        table = versus_local(shown, regime)
        if table:
            lines += [f"### {md(regime)}: each method − local (case-Dice points)", "", *table]
    regimes = cases.regimes()
    sizes = {cases.cap(g) for g in regimes}
    if len(sizes) > 1 and all(LOCAL in cases.variants(g) for g in regimes):
        # Every variant run at two data sizes or more (a study still running has gaps).
        seen = [v for g in regimes for v in cases.variants(g, "main")]
        main = [v for v in dict.fromkeys(seen) if seen.count(v) > 1 and not v.endswith(SELECT_DICE)]
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
    lines += safeguard_section(cases, results, analysis)
    lines += selection_section(cases, results)
    section, best = variants_section(cases, results)
    lines += section
    lines += analysis.patients(cases, results, best)
    return lines
