"""Attacks x defences (a spec's ``attacks`` grid, rows of kind ``attack``): the honest sites'
mean test Dice under each attack and defence, against the method's clean run, paired by seed;
per image and per case (which an empty predictor cannot inflate), and per honest site.

An attack cell's variant is ``<method>.<defence>.<attack>``. A run the attack made diverge has
no scores: it is shown as such, never as a number.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fedoap.report.analysis import NO_ANALYSIS, Analysis, Honest
from fedoap.report.markdown import markdown_table, md
from fedoap.report.rows import num, stat

#: The attacks that poison the model a site sends (``invert_masks`` poisons its data instead).
MODEL_POISONING = ("nan", "scale", "sign_flip", "noise")


def _robust_cell(per: Honest | None, clean: dict[int, float], show_n: bool = False) -> str:
    """One attack x defence cell; ``show_n`` adds its number of seeds, for a table whose cells
    ran different numbers of seeds."""
    if not per:
        return "-"
    n = f" [n={len(per)}]" if show_n else ""
    if any(v is None for v in per.values()):
        diverged = sum(v is None for v in per.values())
        return f"diverged ({diverged} of {len(per)} seeds)" if len(per) > 1 else "diverged"
    d = stat(100 * (v - clean[k]) for k, v in per.items() if k in clean and v is not None)
    cell = stat(per.values()).fmt()  # type: ignore[arg-type]
    return cell + (f" ({d.mean:+.1f})" if d.n else "") + n


def _per_site_table(
    by_cell: dict[tuple[str, str, int], list[dict[str, Any]]],
    clean_rows: list[dict[str, Any]],
    defences: list[str],
    kinds: list[str],
) -> list[str]:
    """Each honest site's test Dice per attack and defence, per image / per case (means over
    seeds): a mean over sites can hide one site's loss behind another's gain, and image Dice can
    hide an empty predictor on a site of mostly empty slices."""
    clients = list(dict.fromkeys(r["client"] for r in clean_rows))

    def both(mine: list[dict[str, Any]], c: str) -> str:
        ours = [r for r in mine if r["client"] == c]
        image = stat(r["test_dice"] for r in ours)
        case = stat(num(r.get("test_case_dice")) for r in ours)
        return f"{image.mean:.3f} / {case.mean:.3f}" if case.n else f"{image.mean:.3f}"

    cells: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    diverged: set[tuple[str, str]] = set()
    for (defence, kind, _), mine in by_cell.items():
        if any(r.get("diverged") for r in mine):
            diverged.add((defence, kind))
        else:
            cells[(defence, kind)] += mine
    body = [["clean (validation, mean)", "", *[both(clean_rows, c) for c in clients]]]
    for kind in kinds:
        for d in defences:
            if (d, kind) in diverged:
                body.append([md(kind), md(d), *["diverged"] * len(clients)])
            elif (d, kind) in cells:
                body.append([md(kind), md(d), *[both(cells[(d, kind)], c) for c in clients]])
    return [
        "Per honest site (test Dice per image / per case, mean over seeds):",
        "",
        *markdown_table(["attack", "defence", *map(md, clients)], body),
        "",
    ]


def _robust_table(
    means: dict[tuple[str, str], Honest],
    clean: dict[int, float],
    defences: list[str],
    kinds: list[str],
    show_n: bool,
) -> list[str]:
    """Attacks (rows) x defences (columns) of the honest sites' mean Dice."""
    body = [
        [md(k), *[_robust_cell(means.get((d, k)), clean, show_n) for d in defences]] for k in kinds
    ]
    return markdown_table(["attack", *map(md, defences)], body)


def _honest_means(
    by_cell: dict[tuple[str, str, int], list[dict[str, Any]]],
    clean_rows: list[dict[str, Any]],
    metric: str,
) -> tuple[dict[tuple[str, str], Honest], dict[int, float]]:
    """The honest sites' mean ``metric`` per (defence, attack) and seed (None: diverged), and
    the clean run's per seed."""
    honest: dict[tuple[str, str], Honest] = defaultdict(dict)
    for (defence, kind, seed), mine in by_cell.items():
        if any(r.get("diverged") for r in mine):
            honest[(defence, kind)][seed] = None
        else:
            honest[(defence, kind)][seed] = float(np.mean([num(r.get(metric)) for r in mine]))
    clean = {
        seed: float(np.mean([num(r.get(metric)) for r in clean_rows if r["seed"] == seed]))
        for seed in sorted({r["seed"] for r in clean_rows})
    }
    return honest, clean


def robustness_section(
    rows: list[dict[str, Any]], figs: Path, rel: str, analysis: Analysis = NO_ANALYSIS
) -> list[str]:
    """Attacks x defences (``attack`` cells): the honest sites' mean test Dice, against the
    method's clean run (its ``main`` cell: validation and the mean, no attack), paired by seed;
    per image and per case, then each method's verdicts from ``analysis`` (its
    :meth:`~fedoap.report.analysis.Analysis.attacks`). Each method's bars go to
    ``figs/robustness_<method>.png``."""
    from fedoap.report.figures import fig_robustness

    attack = [r for r in rows if r["kind"] == "attack"]
    attackers = {r["client"] for r in attack if str(r.get("attacker")) == "1"}
    lines = ["## Robustness: attacks x defences", ""]
    for method in dict.fromkeys(r["method"] for r in attack):
        refused: dict[str, int] = defaultdict(int)
        by_cell: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
        for r in attack:
            if r["method"] == method and r["client"] not in attackers:
                _, defence, kind = r["variant"].split(".")
                by_cell[(defence, kind, r["seed"])].append(r)
        for (defence, _, _), mine in by_cell.items():
            if not any(r.get("diverged") for r in mine):
                count = num(mine[0].get("refused", ""))
                refused[defence] += 0 if math.isnan(count) else int(count)
        clean_rows = [
            r
            for r in rows
            if r["kind"] == "main" and r["variant"] == method and r["client"] not in attackers
        ]
        honest, clean = _honest_means(by_cell, clean_rows, "test_dice")
        by_case, clean_case = _honest_means(by_cell, clean_rows, "test_case_dice")
        # No defence and validation alone first, then the robust rules.
        found = list(dict.fromkeys(d for d, _ in honest))
        defences: list[str] = [d for d in ("none", "validation") if d in found]
        defences += [d for d in found if d not in defences]
        kinds = list(dict.fromkeys(k for _, k in honest))
        # A defence without overrides (validation alone) has no clean cell of its own: its
        # clean run is the main cell, for each seed whose attack cells say so (clean_digest).
        # Any other defence without its clean cell shows "-" (not run) there.
        main_digest = {r["seed"]: r.get("config_digest") for r in clean_rows}
        for d in defences:
            if honest.get((d, "clean")):
                continue
            same = {
                s
                for (dd, _, s), mine in by_cell.items()
                if dd == d and s in main_digest and mine[0].get("clean_digest") == main_digest[s]
            }
            honest[(d, "clean")] = {s: v for s, v in clean.items() if s in same}
            by_case[(d, "clean")] = {s: v for s, v in clean_case.items() if s in same}
        kinds = ["clean", *[k for k in kinds if k != "clean"]]
        seeds_run = sorted({s for per in honest.values() for s in per})
        uneven = len({len(per) for per in honest.values() if per}) > 1

        refused_row = (
            "| uploads refused (all cells) | "
            + " | ".join(str(refused[d]) for d in defences)
            + " |"
        )
        ref = stat(clean[s] for s in seeds_run if s in clean)
        ref_case = stat(clean_case[s] for s in seeds_run if s in clean_case)
        lines += [
            f"### {md(method)}",
            "",
            f"Attacker(s): {', '.join(map(md, sorted(attackers)))}; honest sites: the others. "
            f"Seeds: {seeds_run}. Each cell: the honest sites' mean test Dice (mean ± 95% CI over "
            f"seeds) and, in brackets, its difference in points from the clean run ({md(method)} "
            f"with validation and the mean, no attack: {ref.fmt()}), paired by seed. `diverged`: "
            "the attack made the global model non-finite and the run stopped (no scores)."
            + (
                " The cells ran different numbers of seeds: `[n=k]` gives each one's."
                if uneven
                else ""
            ),
            "",
            *_robust_table(honest, clean, defences, kinds, uneven),
            refused_row,
            "",
            "The same by case Dice (each patient's or video's pixels pooled; an empty prediction "
            "scores 0 on a case with tumour, where per-image Dice scores every empty slice "
            f"predicted empty as 1). Clean: {ref_case.fmt()}.",
            "",
            *_robust_table(by_case, clean_case, defences, kinds, uneven),
            "",
        ]
        lines += _per_site_table(by_cell, clean_rows, defences, kinds)
        lines += analysis.attacks(honest, clean, defences, "test Dice per image")
        lines += analysis.attacks(by_case, clean_case, defences, "test Dice per case")
        fig_robustness(method, honest, clean, defences, kinds, figs / f"robustness_{method}.png")
        lines += [f"![robustness]({rel}/robustness_{method}.png)", ""]
    return lines
