"""The sections that compare regimes (a spec's ``regimes``): the summary, best method and gains
over local per regime, and, where regimes differ in their differential-privacy budget, test Dice
against the epsilon spent (read from ``results.csv``'s ``epsilon``, ``client_epsilon`` and
``dp_unit``, which every DP run records)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fedoap.report.markdown import markdown_table, md
from fedoap.report.rows import FEDOAP, Table, points


def _paired_or_dash(t: Table, a: str, b: str) -> str:
    return points(t.paired(a, b)) if a in t.variants and b in t.variants else "-"


def regimes_summary(rows: list[dict[str, Any]], regimes: list[str], private: set[str]) -> list[str]:
    """Per regime: the best method by mean test Dice, and the best method, FedOAP and FedAvg
    against local (points of Dice, paired by seed, 95% CI)."""
    body = []
    for regime in regimes:
        t = Table([r for r in rows if r["regime"] == regime], "main")
        if not t.rows:
            continue
        ranked = sorted(t.variants, key=lambda v: t.mean(v).mean, reverse=True)
        federated = [v for v in ranked if v not in private]
        best = federated[0] if federated else ranked[0]

        body.append(
            [
                md(regime),
                str(len(t.clients)),
                f"{md(best)} {t.mean(best).fmt()}",
                str(len(t.variants)),
                "local is best" if best == "local" else _paired_or_dash(t, best, "local"),
                _paired_or_dash(t, FEDOAP, "local"),
                _paired_or_dash(t, "fedavg", "local"),
            ]
        )
    header = [
        "regime",
        "clients",
        "best method without pooling (mean test Dice)",
        "methods run",
        "best − local (points)",
        "FedOAP − local (points)",
        "FedAvg − local (points)",
    ]
    return [
        "## Regimes",
        "",
        "Differences are of the client-mean test Dice, paired by seed (same splits and initial "
        "weights), mean ± 95% CI over seeds.",
        "",
        *markdown_table(header, body),
        "",
    ]


def privacy_section(rows: list[dict[str, Any]], regimes: list[str], figs: Path) -> list[str]:
    """Regimes that differ in their DP budget: each method's client-mean test Dice per epsilon
    (a regime without DP is epsilon = inf), and each federated method's gain over local, paired
    by seed: does collaboration gain more over training alone under DP than without it?"""
    from fedoap.report.figures import fig_dice_vs_epsilon

    budget: dict[str, float] = {}
    per_case: dict[str, float] = {}  # regimes under case-level DP-SGD: epsilon per patient
    client_level: dict[str, float] = {}  # regimes under DP-FedAvg instead: its epsilon
    for regime in regimes:
        mine = [r for r in rows if r["regime"] == regime]
        eps = [r["epsilon"] for r in mine if not math.isnan(r["epsilon"])]
        ceps = [r["client_epsilon"] for r in mine if not math.isnan(r["client_epsilon"])]
        if ceps:
            client_level[regime] = float(np.mean(ceps))
        elif eps and any(r.get("dp_unit") == "case" for r in mine):
            per_case[regime] = float(np.mean(eps))
        else:
            budget[regime] = float(np.mean(eps)) if eps else math.inf
    order = sorted(budget, key=lambda g: budget[g])
    extra = [*sorted(per_case, key=lambda g: per_case[g]), *sorted(client_level)]
    cols = [*order, *extra]
    tables = {g: Table([r for r in rows if r["regime"] == g], "main") for g in cols}
    methods = list(dict.fromkeys(v for t in tables.values() for v in t.variants))
    label = {g: "∞ (no DP)" if math.isinf(budget[g]) else f"{budget[g]:.2g}" for g in order}
    header = [f"ε = {label[g]}" for g in order]
    header += [f"{md(g)}: ε = {per_case[g]:.2g} per case" for g in per_case]
    header += [f"{md(g)}: client-level ε = {client_level[g]:.3g}" for g in sorted(client_level)]

    def body_of(key: str) -> list[list[str]]:
        body = [
            [
                md(m),
                *[tables[g].mean(m, key).fmt() if m in tables[g].variants else "-" for g in cols],
            ]
            for m in methods
        ]
        for m in methods:
            if m != "local":
                body.append(
                    [
                        f"{md(m)} − local (points)",
                        *[
                            points(tables[g].paired(m, "local", key))
                            if {m, "local"} <= set(tables[g].variants)
                            else "-"
                            for g in cols
                        ],
                    ]
                )
        return body

    fig_dice_vs_epsilon(
        tables, methods, order, [label[g] for g in order], figs / "dice_vs_epsilon.png"
    )
    return [
        "## Privacy: test Dice against the DP budget",
        "",
        "Each regime is one budget: the epsilon column is the mean over sites of what each spent "
        "(summary.json `privacy.clients`), at delta = 1/(10 n) per site, per training image; a "
        "`per case` column is case-level DP-SGD (`privacy.dp.unit=case`), whose epsilon holds "
        "for a whole patient or video (n counts cases); a client-level column "
        "is DP-FedAvg's epsilon for a whole site (summary.json `privacy.client_level`; it has no "
        "local run, so no `− local`). Client-mean test Dice, mean ± 95% CI over seeds; the "
        "`− local` rows are paired by seed.",
        "",
        *markdown_table(["method", *header], body_of("test_dice")),
        "",
        "The same by case (patient) Dice: an image-level Dice counts an empty prediction on a "
        "tumour-free slice as a perfect 1, so a model that predicts nothing scores well on a "
        "site with many empty slices (brain MRI) and 0 here.",
        "",
        *markdown_table(["method", *header], body_of("test_case_dice")),
        "",
        "![Dice vs epsilon](figures/dice_vs_epsilon.png)",
        "",
    ]
