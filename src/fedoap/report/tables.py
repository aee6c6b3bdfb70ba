"""The report's tables of one set of rows: where the cells ran and what they cost, every method
per client, case-level Dice, the FedOAP ablations and leave-one-client-out. Each returns
markdown lines, ending with a blank line; the ablation and leave-one-out tables are also drawn
as figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fedoap.report.markdown import markdown_table, md, text_table
from fedoap.report.rows import FEDOAP, Table, best_baseline, points, stat

#: How the report names a CPU cell from before runs recorded the processor's model.
CPU_UNNAMED = "a CPU whose model was not recorded"


#: Said when the cells of one report ran on more than one machine.
MIXED_MACHINES = (
    "These cells ran on more than one machine. The same config and seed give different last "
    "digits on different processors, and training can amplify them into whole Dice points "
    "(docs/results/robustness.md measures one such case). Paired differences between "
    "cells from different machines include that."
)


def cost_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Where the cells ran and, on a GPU, each variant's wall time and peak memory per cell."""
    devices = sorted({str(r.get("device_name") or "") for r in rows} - {""})
    if not devices:
        return []  # results from before the device was recorded
    # Before CPU runs recorded their processor, a CPU cell's device was just "cpu".
    named = [CPU_UNNAMED if d == "cpu" else md(d) for d in devices]
    out = [f"Machine: {', '.join(named)}.", ""] + ([MIXED_MACHINES, ""] if len(devices) > 1 else [])
    cells: dict[tuple[str, str], dict[tuple[Any, ...], dict[str, Any]]] = {}
    for r in rows:
        key = (r["config_digest"], r["seed"], r.get("client") if r["kind"] == "loo" else None)
        cells.setdefault((r["kind"], r["variant"]), {})[key] = r
    if not any(not math.isnan(r["peak_memory_gib"]) for r in rows):
        return out
    body = []
    for (kind, variant), found in sorted(cells.items()):
        secs = [r["seconds_total"] for r in found.values() if not math.isnan(r["seconds_total"])]
        mem = [r["peak_memory_gib"] for r in found.values() if not math.isnan(r["peak_memory_gib"])]
        body.append(
            [
                md(kind),
                md(variant),
                str(len(found)),
                f"{np.mean(secs):.0f}" if secs else "-",
                f"{max(mem):.1f}" if mem else "-",
            ]
        )
    header = ["kind", "variant", "cells", "seconds per cell (mean)", "peak GPU memory GiB (max)"]
    return [*out, "### Cost per cell", "", *markdown_table(header, body), ""]


def main_table(t: Table, private: set[str]) -> list[str]:
    """Every method's test Dice per client, its mean, worst client, HD95 and cost, best first;
    then FedOAP's margin over the best baseline on each client."""
    header = [
        "method",
        "seeds",
        *map(md, t.clients),
        "mean",
        "worst client",
        "HD95 px (mean)",
        "MB/round",
        "s/round",
    ]
    body = []
    order = sorted(t.variants, key=lambda v: t.mean(v).mean, reverse=True)
    for v in order:
        name = (
            f"**{v}**"
            if v == FEDOAP
            else md(v) + (" (pools data: not private)" if v in private else "")
        )
        wc, ws = t.worst(v)
        mb = (t.first(v, "bytes_up_per_round") + t.first(v, "bytes_down_per_round")) / 1e6
        body.append(
            [
                name,
                str(len(t.seeds(v))),
                *[t.cell(v, c).fmt() for c in t.clients],
                t.mean(v).fmt(),
                f"{md(wc)} {ws.mean:.3f}",
                t.mean(v, "test_hd95_px").fmt(1),
                f"{mb:.2f}",
                f"{t.first(v, 'seconds_per_round'):.1f}",
            ]
        )
    out = ["## All methods", "", *markdown_table(header, body), ""]
    if FEDOAP in t.variants:
        out += [
            "### FedOAP's margin over the best baseline on each client",
            "",
            "Best baseline = the federated method (not `centralized`, which pools data) with the "
            "highest mean test Dice on that client.",
            "",
            "| client | best baseline | its Dice | FedOAP | margin (points) |",
            "|---|---|---|---|---|",
        ]
        for c in t.clients:
            b = best_baseline(t, c, private)
            if b is None:
                continue
            mb, mf = t.cell(b, c).mean, t.cell(FEDOAP, c).mean
            out.append(f"| {md(c)} | {md(b)} | {mb:.3f} | {mf:.3f} | {100 * (mf - mb):+.1f} |")
        out.append("")
    return out


def case_table(t: Table, private: set[str]) -> list[str]:
    """Dice per case (patient or video), the unit a clinician reads, next to per-image Dice.

    Per-image Dice scores an empty mask predicted empty as 1 and a single false-positive pixel
    on it as 0, so on clients with many tumour-free slices (brain MRI) it mostly measures
    empty-slice handling. Case Dice pools each case's pixels first: ``2|P∩G| / (|P|+|G|)`` over
    the whole case. Where every image is its own case, the two are equal.
    """
    key = "test_case_dice"
    if all(math.isnan(r.get(key, float("nan"))) for r in t.rows):
        return []
    header = ["method", *map(md, t.clients), "mean"]
    out = [
        "## Case-level Dice",
        "",
        "Dice with each case's (patient's or video's) pixels pooled first. Per-image Dice "
        "scores an empty slice predicted empty as 1 and one false-positive pixel on it as 0, so "
        "on brain MRI, with many tumour-free slices, it largely measures empty-slice handling; "
        "case Dice measures the tumour outline. Where every image is its own case (breast US, "
        "Kvasir) the two are equal.",
        "",
    ]
    body = []
    for v in sorted(t.variants, key=lambda v: t.mean(v, key).mean, reverse=True):
        name = f"**{v}**" if v == FEDOAP else md(v) + (" (not private)" if v in private else "")
        cells = [t.cell(v, c, key).fmt() for c in t.clients]
        body.append([name, *cells, t.mean(v, key).fmt()])
    out += [*markdown_table(header, body), ""]
    if FEDOAP in t.variants and "local" in t.variants:
        d = t.paired(FEDOAP, "local", key)
        out += [
            f"Paired by seed, FedOAP − local in case Dice: {points(d)} points.",
            "",
        ]
    return out


def ablation_table(main: Table, ab: Table, figs: Path, rel: str = "figures") -> list[str]:
    """Each ablation against FedOAP on the ablations' seeds; drawn as ``figs/ablations.png``."""
    from fedoap.report.figures import fig_table

    # FedOAP's row uses the ablations' seeds only, so every row averages the same seeds.
    seeds = sorted({r["seed"] for r in ab.rows})
    ref = Table(main.rows, "main", seeds)
    header = ["variant", "seeds", *ab.clients, "mean", "Δ vs fedoap (paired)", "HD95 px (mean)"]
    body = []
    srcs = [(ref, FEDOAP)] if FEDOAP in ref.variants else []
    srcs += [(ab, v) for v in ab.variants]
    base = ref.per_seed(FEDOAP) if FEDOAP in ref.variants else {}
    for t, v in srcs:
        # Variant minus FedOAP in points of client-mean Dice, paired by seed (same splits).
        mine = t.per_seed(v)
        d = stat(100 * (mine[k] - base[k]) for k in sorted(set(mine) & set(base)))
        body.append(
            [
                v,
                ",".join(map(str, t.seeds(v))),
                *[t.cell(v, c).fmt() for c in ab.clients],
                t.mean(v).fmt(),
                "–" if v == FEDOAP else d.fmt(1),
                t.mean(v, "test_hd95_px").fmt(1),
            ]
        )
    fig_table(header, body, figs / "ablations.png", "FedOAP ablations: test Dice (mean ± 95% CI)")
    return [
        "## FedOAP ablations (same protocol)",
        "",
        f"Each variant changes one thing in FedOAP's config. Seeds run: {seeds}; the `fedoap` "
        "row is the main matrix's FedOAP on those seeds only. With one seed a cell shows the "
        "value alone (no CI). Δ: the variant minus FedOAP in points of mean Dice, paired by "
        "seed; an interval containing 0 means the component's effect is not measurable here.",
        "",
        *text_table(header, body),
        "",
        f"![ablations]({rel}/ablations.png)",
        "",
    ]


def _loo_cell(t: Table, variant: str, client: str) -> str:
    dice = t.cell(variant, client)
    if dice.n == 0:
        return "not run"
    return f"{dice.fmt()} / {t.cell(variant, client, 'test_hd95_px').fmt(1)}"


def loo_table(t: Table, figs: Path, rel: str = "figures") -> list[str]:
    """Leave-one-client-out, each held-out client by method and stage; drawn as
    ``figs/leave_one_out.png``."""
    from fedoap.report.figures import fig_table

    stages = ("zero_shot", "adapted", "local_only", "local_full")
    methods = list(dict.fromkeys(v.split(":")[0] for v in t.variants))
    header = ["held-out client", "method", *stages]
    body = []
    for c in t.clients:
        for m in methods:
            body.append(
                [
                    c,
                    m,
                    *[_loo_cell(t, f"{m}:{s}", c) for s in stages],
                ]
            )
    fig_table(header, body, figs / "leave_one_out.png", "Leave-one-client-out: test Dice / HD95 px")
    return [
        "## Unseen client (leave-one-client-out)",
        "",
        "Each client in turn is left out; the method federates the other three, then `fedoap "
        "adapt` scores the held-out client zero-shot (final shared weights, personal parts "
        "averaged over the federation's clients), after fine-tuning (epoch chosen on its "
        "validation split), and against models trained from scratch on the same split with "
        "the adaptation's epochs (`local_only`) and with a federation client's whole budget "
        "(`local_full`). Cells: test Dice / HD95 px.",
        "",
        *text_table(header, body),
        "",
        f"![leave-one-out]({rel}/leave_one_out.png)",
        "",
    ]
