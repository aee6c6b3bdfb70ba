"""``fedoap report`` reads results.csv and cases.csv as untrusted: a name that would become a
path is refused, a score that is not finite is refused, and names reach REPORT.md as text."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from fedoap.errors import FedoapError
from fedoap.fileio import SAFE_NAME_RULE
from tests.conftest import REPO
from tests.test_outputs import assert_one_error_line, fedoap, tree
from tests.test_report import GOALS_FILE, main_row

#: The rule's explanation, after the value, in every refused-name message.
RULE = f"cannot be part of a file name; use {SAFE_NAME_RULE}"


def write_results(folder: Path, rows: list[dict]) -> Path:
    """``rows`` as ``folder/results.csv`` (the bench's columns); returns the file."""
    from fedoap.bench import RESULT_FIELDS

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def matrix(clients=("a", "b"), methods=("local", "fedoap"), regime="", seeds=(0, 1)) -> list:
    return [
        main_row(regime, m, s, c, 0.5 + 0.01 * s + 0.02 * i)
        for s in seeds
        for i, m in enumerate(methods)
        for c in clients
    ]


# ------------------------------------------------------------------------------ names as paths


def test_safe_name_keeps_every_name_the_specs_use_and_refuses_paths():
    from fedoap.errors import UnsafeNameError
    from fedoap.fileio import safe_name

    for name in (
        "fedoap+sg",
        "cases-02",
        "eps-8-case",
        "fedoap.median.sign_flip",
        "fedavg_ft",
        "fedoap-pbl_error_and_band",
        "polyp-sites-rgb",
        "_pooled",
        "x" * 128,
    ):
        assert safe_name(name, "regime", "spec.yaml") == name
    for bad in ("", ".", "..", "../../x", ".hidden", "-rf", "+x", "a/b", "a\\b", "a b", "x" * 129):
        with pytest.raises(UnsafeNameError) as err:
            safe_name(bad, "regime", "spec.yaml")
        assert str(err.value) == f"spec.yaml: regime {bad!r} {RULE}"
    # A newline in the name stays inside the quotes: the message is one line.
    with pytest.raises(FedoapError, match=r"'a\\nb'") as err:
        safe_name("a\nb", "method", "results.csv, line 2")
    assert "\n" not in str(err.value)


def test_a_regime_that_is_a_path_is_one_error_line_and_nothing_is_written(tmp_path):
    # Before: figures/../../x is RESULTS/../x, and the figures were written there.
    results = tmp_path / "deep" / "results"
    rows = matrix(regime="ok") + matrix(regime="../../x")
    path = write_results(results, rows)
    before = tree(tmp_path)

    line = assert_one_error_line(fedoap("report", results, cwd=REPO))

    bad = len(matrix(regime="ok")) + 2  # the first ../../x row (line 1 is the header)
    assert line == f"error: {path}, line {bad}: regime '../../x' {RULE}"
    assert tree(tmp_path) == before  # no figures/, no REPORT.md, nothing beside RESULTS


def test_a_name_that_looks_like_markup_is_printed_as_it_is(tmp_path):
    # The error printer's markup: "[/x]" in a message once ended Rich's markup with a traceback.
    path = write_results(tmp_path / "results", matrix(regime="[/x]"))
    line = assert_one_error_line(fedoap("report", tmp_path / "results", cwd=REPO))
    assert line == f"error: {path}, line 2: regime '[/x]' {RULE}"


@pytest.mark.parametrize(
    ("column", "value", "kind"),
    [
        ("regime", "..", "main"),
        ("regime", "a/b", "main"),
        ("variant", "x/../../y", "main"),  # the image grid globs cells/<variant>-seed*
        ("method", "../../evil", "attack"),  # robustness_<method>.png
        ("variant", "..\\x", "ablation"),
    ],
)
def test_every_name_that_becomes_a_path_is_checked_before_any_output(tmp_path, column, value, kind):
    from fedoap.report import make_report

    results = tmp_path / "results"
    rows = matrix()
    rows[-1] = {**rows[-1], "kind": kind, column: value}
    path = write_results(results, rows)

    with pytest.raises(FedoapError) as err:
        make_report(results)

    assert str(err.value) == f"{path}, line {len(rows) + 1}: {column} {value!r} {RULE}"
    assert [p.name for p in results.iterdir()] == ["results.csv"]


def test_a_leave_one_out_variant_names_no_file_and_passes(tmp_path):
    from fedoap.report import make_report

    results = tmp_path / "results"
    loo = {"kind": "loo", "variant": "fedoap:zero_shot", "method": "fedoap"}
    write_results(results, [*matrix(), {**matrix()[0], **loo}])
    assert "## Unseen client (leave-one-client-out)" in make_report(results).read_text()


# ------------------------------------------------------------------------------ scores


def test_a_score_that_is_not_finite_is_one_error_line_and_nothing_is_written(tmp_path):
    # Before: the report printed "inf ± nan" for this client's Dice.
    results = tmp_path / "results"
    rows = matrix()
    rows[2] = {**rows[2], "test_dice": "inf"}
    path = write_results(results, rows)
    before = tree(tmp_path)

    line = assert_one_error_line(fedoap("report", results, cwd=REPO))

    assert line == (
        f"error: {path}, line 4, column test_dice: 'inf' is not a finite score (a score is a "
        "number, or empty where it is undefined)"
    )
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    ("column", "value"),
    [("test_dice", "-inf"), ("test_hd95_px", "nan"), ("val_dice", "Infinity")],
)
def test_each_score_column_refuses_non_finite_values(tmp_path, column, value):
    from fedoap.report import make_report

    results = tmp_path / "results"
    rows = matrix()
    rows[0] = {**rows[0], column: value}
    path = write_results(results, rows)
    with pytest.raises(FedoapError, match=re.escape(f"{path}, line 2, column {column}: ")):
        make_report(results)
    assert not (results / "figures").exists() and not (results / "REPORT.md").exists()


def test_an_empty_score_is_undefined_not_refused(tmp_path):
    from fedoap.report import make_report

    results = tmp_path / "results"
    rows = matrix()
    rows[0] = {**rows[0], "test_hd95_px": ""}  # HD95 of an empty prediction
    write_results(results, rows)
    assert "## All methods" in make_report(results).read_text()


def case_rows(clients: tuple[str, ...], **change: str) -> list[dict]:
    """cases.csv rows: local and fedoap, two seeds, three cases per client."""
    return [
        {
            "regime": "",
            "kind": "main",
            "variant": v,
            "method": v,
            "seed": s,
            "max_train_cases": "",
            "train_cases": 3,
            "config_digest": f"{v}{s}",
            "client": c,
            "case": f"case{k}",
            "slices": 4,
            "tumour_slices": 2,
            "case_dice": 0.5 + 0.1 * (v == "fedoap") + 0.01 * k,
            "tumour_slice_dice": 0.5,
            "empty_slice_fp_rate": 0.25,
            **change,
        }
        for v in ("local", "fedoap")
        for s in (0, 1)
        for c in clients
        for k in range(3)
    ]


def write_cases(folder: Path, rows: list[dict]) -> Path:
    from fedoap.bench import CASE_RESULT_FIELDS

    path = folder / "cases.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CASE_RESULT_FIELDS)
        w.writeheader()
        w.writerows(rows)
    return path


def test_a_case_score_that_is_not_finite_is_refused_before_any_output(tmp_path):
    from fedoap.report import make_report

    results = tmp_path / "results"
    write_results(results, matrix())
    rows = case_rows(("a", "b"))
    rows[4] = {**rows[4], "case_dice": "inf"}
    path = write_cases(results, rows)
    with pytest.raises(FedoapError) as err:
        make_report(results)
    assert str(err.value) == (
        f"{path}, line 6, column case_dice: 'inf' is not a finite score (a score is a number, "
        "or empty where it is undefined)"
    )
    assert sorted(p.name for p in results.iterdir()) == ["cases.csv", "results.csv"]


# ------------------------------------------------------------------------------ markdown


#: Client names, and how REPORT.md writes them.
HOSTILE = {
    "<script>alert(1)</script>": "&lt;script&gt;alert(1)&lt;/script&gt;",
    "a|b": r"a\|b",
    "[x](http://e.test)": r"\[x\](http://e.test)",
    "**bold**": r"\*\*bold\*\*",
    "_em_": r"\_em\_",
    "`code`": r"\`code\`",
    "line\nbreak": "line&#10;break",
    r"$\frac{$": r"\$\\frac{\$",  # figures draw it as text: mathtext would raise on it
}


def unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def test_names_reach_report_md_as_text(tmp_path):
    from fedoap.report import make_report

    # Before: the client went into REPORT.md as it is, script tag, pipes and all.
    results = tmp_path / "results"
    rows = matrix(clients=("ok_site", *HOSTILE), methods=("local", "fedavg_ft", "fedoap"))
    rows = [{**r, "device_name": "<b>gpu</b>"} for r in rows]
    write_results(results, rows)
    write_cases(results, case_rows(("ok_site", *HOSTILE)))

    # With the study's sections, which write the same names.
    text = make_report(results, GOALS_FILE).read_text()

    assert "<" not in text  # no tag of any kind
    for name, shown in HOSTILE.items():
        assert name not in text and shown in text, name
    assert "Machine: &lt;b&gt;gpu&lt;/b&gt;." in text
    # Ordinary names are written as they are: the committed reports do not change.
    assert "| fedavg_ft |" in text and "ok_site" in text and "**fedoap**" in text
    # Every table keeps its columns: each row has as many cell borders as its header.
    block: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
            continue
        assert len({unescaped_pipes(b) for b in block}) <= 1, block
        block = []
    assert "| &lt;script&gt;alert(1)&lt;/script&gt; |" in text.split("# Per patient")[1]


def test_md_leaves_ordinary_names_alone_and_keeps_names_apart():
    from fedoap.report import md

    ordinary = (
        "fedavg_ft",
        "fedoap-pbl_error_and_band",
        "fedoap.median.sign_flip",
        "fedavg:zero_shot",
        "fedoap+sg",
        "Intel(R) Xeon(R) Processor @ 2.80GHz",
        "NVIDIA H100 80GB HBM3",
        "lgg_cs",
    )
    for name in ordinary:
        assert md(name) == name
    assert md("_x_") == r"\_x\_" and md("a__b") == "a__b"
    assert md("a&lt;b") == "a&amp;lt;b" and md("a<b") == "a&lt;b"
    assert md("x\ny") == "x&#10;y"
    names = ["a<b", "a&lt;b", "a\\<b", "a_b", "a\\_b", "_a", "\\_a", "a\nb", "a&#10;b"]
    assert len({md(n) for n in names}) == len(names)
