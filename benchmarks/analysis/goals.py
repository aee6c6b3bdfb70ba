"""The goals of this repository's studies, as ``fedoap report`` sections.

Pass this file to the report of any results folder under ``benchmarks/results/``::

    fedoap report benchmarks/results/robustness --analysis benchmarks/analysis/goals.py

It adds, where the results have what each needs:

* **the headline goals** (``paper.yaml``, and every regime with FedOAP): FedOAP's mean Dice
  above every baseline's, above ``local`` on every client, at least +2.5 points over FedDP
  (established only by the paired interval), and HD95 no worse than the best baseline's; then
  FedOAP minus each reference, paired by seed;
* **the robustness goal** (``robustness.yaml``): with validation and the best robust aggregator,
  the honest sites stay within 2 points of clean under every model-poisoning attack;
* **the scarcity goals** (``scarcity.yaml``): at the scarcest setting, the best FedOAP variant by
  validation beats local per patient; with the safeguard, no setting's mean more than 2 points
  below local and no site more than 5;
* the methods drawn in the validation-curve figure.
"""

from __future__ import annotations

import math
from typing import Any

from fedoap.patients import FEDOAP, LOCAL, Cases, Comparison, compare, rests_on, size_label
from fedoap.report import (
    MODEL_POISONING,
    Analysis,
    Honest,
    Stat,
    Table,
    best_baseline,
    md,
    md_code,
    points,
    stat,
)

#: The methods drawn in ``dice_vs_round.png``: FedOAP and the baselines it is judged against.
MAIN_CURVES = ("fedoap", "feddp", "local", "fedavg", "fedavg_ft", "ditto")

#: FedOAP's margin over FedDP that the paired interval must establish, in points of Dice.
FEDDP_MARGIN = 2.5
#: The most the honest sites may lose against clean under any model-poisoning attack, in points.
ROBUST_DROP = 2.0
#: How far the safeguard may fall below local, in points of case Dice: on a setting's mean over
#: sites, and on any one site.
MEAN_BOUND, SITE_BOUND = 2.0, 5.0


def goals(t: Table, private: set[str]) -> list[str]:
    """The headline goals on one regime's main cells (nothing without FedOAP and a baseline)."""
    if FEDOAP not in t.variants:
        return []
    f = t.mean(FEDOAP).mean
    baselines = [v for v in t.variants if v != FEDOAP and v not in private]
    best = best_baseline(t, None, private)
    if best is None:
        return []
    out = ["## The goals, measured", ""]
    ok = f > t.mean(best).mean
    out.append(
        f"- FedOAP's mean Dice above every baseline's: **{'yes' if ok else 'no'}** "
        f"(FedOAP {f:.3f}; best baseline {md(best)} {t.mean(best).mean:.3f})."
    )
    if "local" in t.variants:
        worse = [c for c in t.clients if t.cell(FEDOAP, c).mean <= t.cell("local", c).mean]
        out.append(
            f"- FedOAP above `local` on every client (no negative transfer): "
            f"**{'yes' if not worse else 'no'}**"
            + (f" — not on {', '.join(map(md, worse))}." if worse else ".")
        )
    if "feddp" in t.variants:
        margin = 100 * (f - t.mean("feddp").mean)
        d = t.paired(FEDOAP, "feddp")
        low = 100 * (d.mean - d.ci)
        # Only the paired interval's lower bound can establish the margin; the mean alone
        # cannot, because the seeds' spread is several points.
        if margin < FEDDP_MARGIN:
            verdict = "no"
        elif d.n >= 2 and low >= FEDDP_MARGIN:
            verdict = "yes"
        else:
            verdict = "on the mean only, not established"
        out.append(
            f"- Margin over FedDP at least +{FEDDP_MARGIN:g} points: **{verdict}** "
            f"({margin:+.1f} points of mean Dice; the paired 95% interval's lower bound is "
            f"{low:+.1f}, see below)."
        )
    hd_f = t.mean(FEDOAP, "test_hd95_px").mean
    # Methods that predicted nothing on some client's test set have no defined mean HD95.
    defined = [v for v in baselines if not math.isnan(t.mean(v, "test_hd95_px").mean)]
    if defined and not math.isnan(hd_f):
        hd_best = min(defined, key=lambda v: t.mean(v, "test_hd95_px").mean)
        hd_b = t.mean(hd_best, "test_hd95_px").mean
        out.append(
            f"- HD95 no worse than the best baseline's: **{'yes' if hd_f <= hd_b else 'no'}** "
            f"(FedOAP {hd_f:.2f} px; best {md(hd_best)} {hd_b:.2f} px; methods with an undefined "
            "mean HD95 on some client are left out)."
        )
    out += [
        "",
        "Paired by seed (every method sees the same splits), FedOAP minus each reference, in "
        "points of mean test Dice (mean ± 95% CI over seeds; an interval that contains 0 is no "
        "evidence either way):",
        "",
    ]
    for ref in dict.fromkeys(v for v in ("local", best, "feddp", "fedavg") if v in t.variants):
        d = t.paired(FEDOAP, ref)
        out.append(f"- FedOAP − {md(ref)}: {points(d)}")
    out.append("")
    return out


def _drop(per: Honest, clean: dict[int, float]) -> Stat:
    """Clean minus attacked, in points of Dice, paired by seed (diverged seeds excluded)."""
    return stat(100 * (clean[k] - v) for k, v in per.items() if k in clean and v is not None)


def robustness_goal(
    honest: dict[tuple[str, str], Honest],
    clean: dict[int, float],
    defences: list[str],
    measure: str = "test Dice per image",
) -> list[str]:
    """The robustness goal: with validation and the best robust aggregator, the honest sites
    stay within 2 points of clean (mean drop over seeds) under every model-poisoning attack.
    Only a defence that ran every one of those attacks can be judged; one that missed some is
    listed, never picked as the best on the attacks it happened to run."""
    worst: dict[str, float] = {}
    own: dict[str, float] = {}  # the same, against the defence's own clean run
    missing: dict[str, list[str]] = {}
    seeds: dict[str, int] = {}
    for d in defences:
        cells = {k: honest.get((d, k)) for k in MODEL_POISONING}
        missing[d] = [k for k, per in cells.items() if not per]
        ran = [per for per in cells.values() if per]
        if ran:
            worst[d] = max(
                math.inf if any(v is None for v in per.values()) else _drop(per, clean).mean
                for per in ran
            )
            seeds[d] = min(len(per) for per in ran)
            base = {s: v for s, v in (honest.get((d, "clean")) or {}).items() if v is not None}
            drops = [
                math.inf if any(v is None for v in per.values()) else _drop(per, base).mean
                for per in ran
            ]
            if base and not any(math.isnan(x) for x in drops):
                own[d] = max(drops)
    judged = {d: w for d, w in worst.items() if d not in ("none", "validation") and not missing[d]}
    partial = [d for d in worst if d not in ("none", "validation") and missing[d]]
    if not judged and not partial:
        return []
    if judged:
        # Rules are compared on equal footing: only those with the most seeds behind them (a
        # rule's one good seed must not beat another's three).
        most = max(seeds[d] for d in judged)
        best = min((d for d in judged if seeds[d] == most), key=lambda d: judged[d])
        verdict = "met" if judged[best] <= ROBUST_DROP else "not met"
        head = (
            f"**{verdict}**. The best is {md_code(best)}, whose worst drop is "
            f"{judged[best]:.1f} points (mean over seeds; the fewest seeds behind one of its "
            f"cells: {seeds[best]})."
        )
        fewer = [d for d in judged if seeds[d] < most]
        if fewer:
            head += (
                " Not compared, on fewer seeds: "
                + ", ".join(f"{md(d)} (n={seeds[d]})" for d in fewer)
                + "."
            )
    else:
        head = "**not judged**: no robust aggregator ran every model-poisoning attack."
    out = [
        f"Goal, by {measure} (validation + the best robust aggregator keeps the honest sites "
        f"within {ROBUST_DROP:g} points of clean under every model-poisoning attack: "
        f"{', '.join(MODEL_POISONING)}): {head} "
        "Worst drop per defence (+: below clean): "
        + ", ".join(f"{md(d)} {w:.1f}" for d, w in worst.items())
        + "."
    ]
    if own:
        out[0] += (
            " The attack's own damage, against each defence's clean run (which already differs "
            "from the mean's): " + ", ".join(f"{md(d)} {w:.1f}" for d, w in own.items()) + "."
        )
    if partial:
        out[0] += (
            " Not judged, for attacks not run: "
            + "; ".join(f"{md(d)} (no {', '.join(map(md, missing[d]))})" for d in partial)
            + "."
        )
    return [*out, ""]


def safeguard_met(vs_local: Comparison) -> bool:
    """The safeguard's bounds, on one setting: its mean and its worst site against local."""
    worst = min(i.mean for i in vs_local.per_site.values())
    return 100 * vs_local.mean.mean >= -MEAN_BOUND and 100 * worst >= -SITE_BOUND


def scarcity_goals(cases: Cases, results: list[dict[str, Any]], best: dict[str, str]) -> list[str]:
    """The scarcity study's goals: at its scarcest setting, and for the safeguard over all."""
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
            f"- At the scarcest setting ({size_label(cases, scarce)} training patients per site), "
            f"the best FedOAP variant by validation ({md_code(variant)}) beats local with a "
            f"per-patient interval that excludes 0: **{verdict}** ({c.mean.fmt()} points of "
            f"case Dice; {rests_on(c)})."
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
                    worst_site = (100 * i.mean, site, size_label(cases, regime))
        if math.isinf(worst_mean):
            continue
        ok = "met" if worst_mean >= -MEAN_BOUND and worst_site[0] >= -SITE_BOUND else "not met"
        lines.append(
            f"- With the safeguard ({md_code(v)}), no setting's mean more than {MEAN_BOUND:g} "
            f"points below local and no site more than {SITE_BOUND:g} below: **{ok}** "
            f"(worst mean {worst_mean:+.1f}; worst site {md(worst_site[1])} at "
            f"{worst_site[2]} patients, {worst_site[0]:+.1f})."
        )
    return [*lines, ""]


class StudyGoals(Analysis):
    """This repository's studies, judged in their reports."""

    curves = MAIN_CURVES

    def main(self, table: Table, private: set[str]) -> list[str]:
        return goals(table, private)

    def attacks(
        self,
        honest: dict[tuple[str, str], Honest],
        clean: dict[int, float],
        defences: list[str],
        measure: str,
    ) -> list[str]:
        return robustness_goal(honest, clean, defences, measure)

    def safeguard_goal(self) -> str:
        return (
            f"Goal: no setting's mean more than {MEAN_BOUND:g} points below local, and no site "
            f"more than {SITE_BOUND:g} points below."
        )

    def safeguard_verdict(self, vs_local: Comparison) -> str:
        return "met" if safeguard_met(vs_local) else "not met"

    def patients(
        self, cases: Cases, results: list[dict[str, Any]], best: dict[str, str]
    ) -> list[str]:
        return scarcity_goals(cases, results, best)


ANALYSIS = StudyGoals()
