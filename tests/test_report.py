"""Report statistics on hand-made rows with known answers."""

from __future__ import annotations

import math

import pytest

from fedoap.report import Analysis, Table, load_analysis
from tests.conftest import REPO

#: This repository's study goals, the sections ``fedoap report --analysis`` adds.
GOALS_FILE = REPO / "benchmarks" / "analysis" / "goals.py"


def study_goals() -> Analysis:
    return load_analysis(GOALS_FILE)


def rows(variant, seed_values, kind="main"):
    # seed_values: {seed: {client: dice}}
    return [
        {"kind": kind, "variant": variant, "seed": s, "client": c, "test_dice": d}
        for s, per_client in seed_values.items()
        for c, d in per_client.items()
    ]


def test_paired_difference_is_over_common_seeds_of_client_means():
    a = rows("a", {0: {"x": 0.6, "y": 0.4}, 1: {"x": 0.7, "y": 0.5}, 2: {"x": 0.9, "y": 0.9}})
    b = rows("b", {0: {"x": 0.5, "y": 0.3}, 1: {"x": 0.5, "y": 0.5}})  # no seed 2
    t = Table(a + b, "main")
    d = t.paired("a", "b")
    # Seed 0: 0.5 - 0.4 = 0.1; seed 1: 0.6 - 0.5 = 0.1. Seed 2 has no partner.
    assert d.n == 2 and d.mean == pytest.approx(0.1) and d.ci == pytest.approx(0.0, abs=1e-12)
    assert t.mean("a").n == 3 and t.mean("a").mean == pytest.approx((0.5 + 0.6 + 0.9) / 3)


def test_seed_missing_a_client_is_left_out_of_the_mean_and_seed_filter_applies():
    a = rows("a", {0: {"x": 0.2, "y": 0.4}, 1: {"x": 1.0}})
    t = Table(a, "main")
    assert t.per_seed("a") == {0: pytest.approx(0.3)}
    only1 = Table(a, "main", seeds=[1])
    assert only1.seeds("a") == [1] and math.isnan(only1.cell("a", "y").mean)


def _goal_line(lines, prefix):
    return next(line for line in lines if line.startswith(prefix))


def test_feddp_margin_is_established_only_by_the_paired_interval():
    goals = study_goals().main

    def table(fedoap_by_seed):
        base = {s: {"x": 0.5, "y": 0.5} for s in (0, 1, 2)}
        r = rows("feddp", base) + rows("local", base)
        r += rows("fedoap", {s: {"x": v, "y": v} for s, v in fedoap_by_seed.items()})
        for row in r:
            row["test_hd95_px"] = 10.0
        return Table(r, "main")

    margin = "- Margin over FedDP"
    # +3 points on every seed: the interval is tight and clears 2.5.
    steady = goals(table({0: 0.53, 1: 0.53, 2: 0.53}), set())
    assert "**yes**" in _goal_line(steady, margin)
    # +3 points on the mean, but one seed loses: the mean passes, the interval does not.
    noisy = goals(table({0: 0.60, 1: 0.55, 2: 0.44}), set())
    assert "**on the mean only, not established**" in _goal_line(noisy, margin)
    # Below 2.5 on the mean.
    assert "**no**" in _goal_line(goals(table({0: 0.51, 1: 0.51, 2: 0.51}), set()), margin)


def test_a_single_seed_difference_claims_no_interval():
    from fedoap.report import points, stat

    assert points(stat([0.05])) == "+5.0 (n = 1: one seed, no interval)"
    assert points(stat([0.04, 0.06])).startswith("+5.0 ± ")


def test_cost_per_cell_counts_each_cell_once_and_takes_the_peak():
    from fedoap.report import cost_lines

    def cell(variant, seed, secs, mem):
        return [
            {
                "kind": "main",
                "variant": variant,
                "seed": seed,
                "client": c,
                "config_digest": f"{variant}{seed}",
                "seconds_total": secs,
                "peak_memory_gib": mem,
                "device_name": "NVIDIA H100 80GB HBM3",
            }
            for c in ("x", "y")  # one row per client, the cell's figures on each
        ]

    r = (
        cell("fedoap", 0, 100.0, 9.5)
        + cell("fedoap", 1, 140.0, 10.25)
        + cell("local", 0, 60.0, 7.0)
    )
    lines = cost_lines(r)
    assert lines[0] == "Machine: NVIDIA H100 80GB HBM3."
    row = next(ln for ln in lines if ln.startswith("| main | fedoap"))
    assert row == "| main | fedoap | 2 | 120 | 10.2 |"  # mean of 100 and 140; max of the peaks
    # CPU-only results (no device recorded, or no GPU memory): no cost table.
    cpu = [{**x, "device_name": "cpu", "peak_memory_gib": math.nan} for x in r]
    assert cost_lines(cpu) == ["Machine: a CPU whose model was not recorded.", ""]
    # Since CPU runs record their processor, cells from two machines name both.
    xeon = [{**x, "device_name": "Intel(R) Xeon(R) Processor @ 2.80GHz"} for x in cpu[:2]]
    mixed = cost_lines(xeon + cpu[2:])
    assert mixed[0] == (
        "Machine: Intel(R) Xeon(R) Processor @ 2.80GHz, a CPU whose model was not recorded."
    )
    assert mixed[2].startswith("These cells ran on more than one machine.")
    assert not any("more than one machine" in ln for ln in cost_lines(cpu))
    assert cost_lines([{**x, "device_name": ""} for x in r]) == []


def main_row(regime: str, method: str, seed: int, client: str, dice: float, **extra) -> dict:
    """A results.csv row of a main cell whose every score is ``dice``."""
    return {
        "kind": "main",
        "variant": method,
        "method": method,
        "seed": seed,
        "client": client,
        "test_dice": dice,
        "test_iou": dice,
        "test_hd95_px": 5.0,
        "test_case_dice": dice,
        "best_round": 1,
        "val_dice": dice,
        "seconds_total": 10.0,
        "seconds_per_round": 1.0,
        "bytes_up_per_round": 1000,
        "bytes_down_per_round": 1000,
        "breaks_privacy": 0,
        "config_digest": f"{regime}{method}{seed}",
        "val_curve": f"{dice};{dice}",
        "regime": regime,
        **extra,
    }


def report_of(folder, rows: list[dict], analysis=None) -> str:
    """``fedoap report``'s text for ``rows`` written as ``folder/results.csv`` (with the
    sections of the ``analysis`` file, if one is named)."""
    import csv

    from fedoap.bench import RESULT_FIELDS
    from fedoap.report import make_report

    with open(folder / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return make_report(folder, analysis).read_text()


def test_report_has_a_table_per_regime_and_a_regimes_summary(tmp_path):
    # fedoap is local + 5 points in regime "sites" and local - 2 points in "organs", on every
    # seed and client; fedavg is local + 1 point everywhere.
    shift = {"sites": {"fedoap": 0.05, "fedavg": 0.01}, "organs": {"fedoap": -0.02, "fedavg": 0.01}}
    out = []
    for regime, by_method in shift.items():
        for method in ("local", "fedoap", "fedavg"):
            for seed in (0, 1, 2):
                for i, client in enumerate(("a", "b")):
                    dice = 0.5 + 0.1 * i + 0.02 * seed + by_method.get(method, 0.0)
                    out.append(main_row(regime, method, seed, client, dice))
    text = report_of(tmp_path, out)
    summary = text[text.index("## Regimes") : text.index("# Regime: ")]
    organs = next(ln for ln in summary.splitlines() if ln.startswith("| organs"))
    sites = next(ln for ln in summary.splitlines() if ln.startswith("| sites"))
    assert "| fedoap " in sites and "+5.0 ± 0.0 (n = 3)" in sites and "+1.0 ± 0.0 (n = 3)" in sites
    assert "| fedavg " in organs and "-2.0 ± 0.0 (n = 3)" in organs
    # best - local, FedOAP - local, FedAvg - local
    assert sites.split("|")[5:8] == [
        " +5.0 ± 0.0 (n = 3) ",
        " +5.0 ± 0.0 (n = 3) ",
        " +1.0 ± 0.0 (n = 3) ",
    ]
    assert organs.split("|")[5:8] == [
        " +1.0 ± 0.0 (n = 3) ",
        " -2.0 ± 0.0 (n = 3) ",
        " +1.0 ± 0.0 (n = 3) ",
    ]
    assert text.count("# Regime: ") == 2 and text.count("## All methods") == 2
    for regime in shift:
        assert (tmp_path / "figures" / regime / "per_client_dice.png").is_file()
        assert f"figures/{regime}/per_client_dice.png" in text


def test_privacy_regimes_are_ordered_by_the_epsilon_spent_with_the_gain_over_local(tmp_path):
    # Under eps 1, fedoap is local + 4 points; without DP, local + 1 point.
    gain = {"eps-1": (0.9, 0.04), "eps-inf": (None, 0.01)}
    out = []
    for regime, (eps, d) in gain.items():
        for method in ("local", "fedoap"):
            for seed in (0, 1):
                for client in ("a", "b"):
                    dice = 0.4 + 0.01 * seed + (d if method == "fedoap" else 0.0)
                    out.append(main_row(regime, method, seed, client, dice, epsilon=eps))
    # DP-FedAvg instead: fedoap alone, its client-level epsilon in its own column.
    out += [
        {**r, "regime": "client-dp", "epsilon": None, "client_epsilon": 12.0, "test_dice": 0.1}
        for r in out
        if r["regime"] == "eps-inf" and r["method"] == "fedoap"
    ]
    # Case-level DP-SGD at a smaller epsilon: its own column, after the per-image budgets (its
    # epsilon is per patient, not comparable), with fedoap = local - 3 points.
    out += [
        {
            **r,
            "regime": "eps-8-case",
            "epsilon": 0.5,
            "dp_unit": "case",
            "test_dice": r["test_dice"] - (0.04 + 0.03 if r["method"] == "fedoap" else 0.0),
        }
        for r in out
        if r["regime"] == "eps-1"
    ]
    text = report_of(tmp_path, out)
    section = text[text.index("## Privacy") :]
    header = next(ln for ln in section.splitlines() if ln.startswith("| method"))
    assert header.split("|")[2:6] == [
        " ε = 0.9 ",
        " ε = ∞ (no DP) ",
        " eps-8-case: ε = 0.5 per case ",
        " client-dp: client-level ε = 12 ",
    ]
    gain_row = next(ln for ln in section.splitlines() if ln.startswith("| fedoap − local"))
    assert gain_row.split("|")[2:6] == [
        " +4.0 ± 0.0 (n = 2) ",
        " +1.0 ± 0.0 (n = 2) ",
        " -3.0 ± 0.0 (n = 2) ",
        " - ",
    ]
    fedoap_row = next(ln for ln in section.splitlines() if ln.startswith("| fedoap |"))
    assert fedoap_row.split("|")[5].strip() == "0.100 ± 0.000"
    assert (tmp_path / "figures" / "dice_vs_epsilon.png").stat().st_size > 1000


def test_the_robustness_goal_judges_only_a_defence_that_ran_every_model_poisoning_attack():
    from fedoap.report import MODEL_POISONING
    from fedoap.report.attacks import _robust_cell

    def robustness_goal(honest, clean, defences):
        return study_goals().attacks(honest, clean, defences, "test Dice per image")

    clean = {0: 0.50, 1: 0.60}
    # median: every model-poisoning attack, worst drop 1.5 points (sign_flip, paired by seed);
    # krum: only nan, no drop at all, so it must not be judged the best on that alone.
    honest = {("median", k): {0: 0.50, 1: 0.60} for k in MODEL_POISONING}
    honest[("median", "sign_flip")] = {0: 0.49, 1: 0.58}
    honest[("krum", "nan")] = {0: 0.51}
    honest[("none", "nan")] = {0: None, 1: None}
    honest[("median", "clean")] = {0: 0.52, 1: 0.60}  # the median's own clean run
    (line, blank) = robustness_goal(honest, clean, ["none", "median", "krum"])
    assert blank == ""
    # Against that run, sign_flip costs (3 + 2) / 2 points and nan (2 + 0) / 2: the worst, 2.5.
    assert "against each defence's clean run (which already differs from the mean's): " in line
    assert line.endswith(
        "median 2.5. Not judged, for attacks not run: krum (no scale, sign_flip, noise)."
    )
    assert "**met**. The best is `median`, whose worst drop is 1.5 points" in line
    assert "fewest seeds behind one of its cells: 2" in line
    assert "none inf" in line  # a diverged run is the worst possible drop
    assert "Not judged, for attacks not run: krum (no scale, sign_flip, noise)" in line

    # trimmed_mean ran every attack but on seed 0 only, where it gains: it is not compared
    # with the median's two seeds, which stays the rule the verdict rests on.
    trimmed = {("trimmed_mean", k): {0: 0.52} for k in MODEL_POISONING}
    (line, _) = robustness_goal({**honest, **trimmed}, clean, ["none", "median", "trimmed_mean"])
    assert "The best is `median`, whose worst drop is 1.5 points" in line
    assert "Not compared, on fewer seeds: trimmed_mean (n=1)." in line

    honest[("median", "noise")] = {0: 0.47, 1: 0.58}  # a 2.5-point mean drop: over the goal
    (line, _) = robustness_goal(honest, clean, ["none", "median", "krum"])
    assert "**not met**. The best is `median`, whose worst drop is 2.5 points" in line
    del honest[("median", "scale")]
    (line, _) = robustness_goal(honest, clean, ["none", "median", "krum"])
    assert "**not judged**: no robust aggregator ran every model-poisoning attack" in line

    assert (
        _robust_cell({0: 0.49, 1: 0.58}, clean, show_n=True) == "0.535 ± 0.572 (-1.5) [n=2]"
    )  # t(0.975, 1) = 12.71
    assert _robust_cell({0: None, 1: 0.5}, clean) == "diverged (1 of 2 seeds)"


def test_robustness_is_reported_per_case_too_where_an_empty_predictor_hides_the_damage(tmp_path):
    # Clean: both honest sites at 0.5 (image and case). Under `scale` with the median, site "a"
    # predicts nothing on mostly empty slices: image Dice up to 0.7, case Dice down to 0.
    out = []
    for seed in (0, 1):
        for client in ("a", "b", "bad"):
            out.append(main_row("", "fedavg", seed, client, 0.5, attacker=""))
            attacked = {"a": (0.7, 0.0), "b": (0.5, 0.5), "bad": (0.1, 0.1)}[client]
            row = main_row("", "fedavg", seed, client, attacked[0], test_case_dice=attacked[1])
            # validation has no overrides: its clean run is the main cell (same clean_digest).
            # median has overrides and no clean cell here: its clean run is not run.
            for defence, clean_digest in (("validation", f"fedavg{seed}"), ("median", "med")):
                out.append(
                    {
                        **row,
                        "kind": "attack",
                        "variant": f"fedavg.{defence}.scale",
                        "attacker": int(client == "bad"),
                        "config_digest": f"{defence}scale{seed}",
                        "clean_digest": clean_digest,
                    }
                )
    text = report_of(tmp_path, out, analysis=GOALS_FILE)
    section = text[text.index("## Robustness") :]
    scale_rows = [ln for ln in section.splitlines() if ln.startswith("| scale |")]
    image, case = scale_rows[0], scale_rows[1]  # the image table comes first, then the case one
    assert image.split("|")[2:4] == [" 0.600 ± 0.000 (+10.0) "] * 2
    assert case.split("|")[2:4] == [" 0.250 ± 0.000 (-25.0) "] * 2
    clean_row = next(ln for ln in section.splitlines() if ln.startswith("| clean |"))
    assert clean_row.split("|")[2:4] == [" 0.500 ± 0.000 (+0.0) ", " - "]
    per_site = next(ln for ln in section.splitlines() if ln.startswith("| scale | median |"))
    assert per_site.split("|")[3:5] == [" 0.700 / 0.000 ", " 0.500 / 0.500 "]
    # Only scale ran: no defence can be judged on every model-poisoning attack, by either measure.
    assert section.count("**not judged**") == 2


def test_a_study_adds_its_sections_only_where_it_is_named(tmp_path):
    # fedoap beats feddp by 3 points on every seed; the report alone states no goal.
    out = [
        main_row("", method, seed, client, 0.5 + 0.01 * seed + shift)
        for method, shift in (("local", 0.0), ("feddp", 0.0), ("fedoap", 0.03))
        for seed in (0, 1, 2)
        for client in ("a", "b")
    ]
    plain = report_of(tmp_path, out)
    assert "## All methods" in plain and "## The goals, measured" not in plain
    judged = report_of(tmp_path, out, analysis=GOALS_FILE)
    assert "- Margin over FedDP at least +2.5 points: **yes**" in judged
    assert judged.index("## All methods") < judged.index("## The goals, measured")
    # Everything else is the same text.
    start = judged.index("## The goals, measured")
    goals = judged[start : judged.index("\n## ", start) + 1]
    # Everything else is the same text, the command that made it naming the analysis file.
    named = f" --analysis {GOALS_FILE}`"
    assert named in judged
    assert judged.replace(goals, "").replace(named, "`", 1) == plain

    # A file of one's own: a subclass overriding one hook, bound to ANALYSIS.
    mine = tmp_path / "mine.py"
    mine.write_text(
        "from fedoap.report import Analysis\n"
        "class Mine(Analysis):\n"
        "    def main(self, table, private):\n"
        "        return [f'## Mine: {len(table.variants)} methods', '']\n"
        "ANALYSIS = Mine()\n"
    )
    assert "## Mine: 3 methods" in report_of(tmp_path, out, analysis=mine)


def test_an_analysis_file_that_is_missing_or_binds_nothing_is_refused_by_name(tmp_path):
    from fedoap.errors import ConfigError, NotFoundError

    with pytest.raises(NotFoundError, match=f"analysis file {tmp_path / 'nope.py'} not found"):
        load_analysis(tmp_path / "nope.py")
    empty = tmp_path / "empty.py"
    empty.write_text("ANALYSIS = 1\n")
    with pytest.raises(ConfigError, match="binds no ANALYSIS to an instance of"):
        load_analysis(empty)


def test_the_command_line_names_a_missing_analysis_file_in_one_line(tmp_path):
    from tests.test_outputs import assert_one_error_line, fedoap

    report_of(tmp_path, [main_row("", "local", 0, "a", 0.5)])
    missing = tmp_path / "goals.py"
    res = fedoap("report", tmp_path, "--analysis", missing)
    assert_one_error_line(res, f"analysis file {missing} not found")
