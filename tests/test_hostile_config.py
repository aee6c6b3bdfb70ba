"""Hostile configs and options: each ends in one ``error:`` line (exit 2) naming the file or key,
before any run folder exists. Never a traceback, never a silent last-wins.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from fedoap.config import ConfigError, load_config, load_yaml
from tests.conftest import tiny_config
from tests.test_outputs import assert_one_error_line, fedoap, finished_run  # noqa: F401


@pytest.fixture
def cfg_text() -> str:
    return yaml.safe_dump(tiny_config().to_dict(), sort_keys=False)


def run_refused(tmp_path: Path, text: str, *overrides: str) -> str:
    """``fedoap run`` on ``text``: the one error line; the run folder never appears."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    res = fedoap("run", "-c", cfg, "-o", tmp_path / "run", *overrides)
    line = assert_one_error_line(res)
    assert not (tmp_path / "run").exists()
    return line


def test_a_nul_byte_in_the_yaml_is_one_error_line(tmp_path, cfg_text):
    lines = cfg_text.splitlines()
    lines[2] += "\x00"
    line = run_refused(tmp_path, "\n".join(lines) + "\n")
    where = tmp_path / "c.yaml"
    assert line == f"error: {where}: not valid YAML: character U+0000 at line 3 is not allowed"


def test_a_5000_digit_integer_in_a_file_or_an_override(tmp_path, cfg_text):
    huge = "9" * 5000
    text = cfg_text.replace("rounds: 2", f"rounds: {huge}")
    assert text != cfg_text
    line = run_refused(tmp_path, text)
    assert line.endswith("c.yaml: not valid YAML: a number has more than 4300 digits")
    line = run_refused(tmp_path, cfg_text, f"federation.rounds={huge}")
    assert (
        line
        == "error: override federation.rounds: not valid YAML: a number has more than 4300 digits"
    )


def test_an_integer_past_64_bits_is_refused_in_one_short_line(tmp_path, cfg_text):
    line = run_refused(tmp_path, cfg_text, f"federation.rounds={'9' * 4000}")
    assert re.fullmatch(
        r"error: federation.rounds: an integer of about 400[01] digits is out of range "
        r"\(a 64-bit integer\)",
        line,
    ), line
    with pytest.raises(ConfigError, match=r"^seed: .* out of range"):
        load_config(None, [f"seed={2**63}"])


def test_a_timestamp_that_is_not_a_date_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^x.yaml: not valid YAML: month must be in 1..12$"):
        load_yaml("when: 2026-13-45\n", "x.yaml")


def test_duplicate_keys_are_an_error_not_last_wins(tmp_path, cfg_text):
    text = cfg_text.replace("  rounds: 2\n", "  rounds: 2\n  rounds: 3\n")
    assert text != cfg_text
    line = run_refused(tmp_path, text)
    assert "c.yaml: duplicate key 'rounds' at line" in line
    # the same key in two different sections, and YAML's merge keys, stay legal
    assert load_yaml("a: {x: 1}\nb: {x: 2}\n", "y") == {"a": {"x": 1}, "b": {"x": 2}}
    merged = load_yaml("base: &b {x: 1}\nc:\n  <<: *b\n  y: 2\n", "y")
    assert merged["c"] == {"x": 1, "y": 2}


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("a\x00b", r"'a\x00b'"),
        ("x" * 300, "'xxxxxxxx"),
        ("..", "'..'"),
        (".hidden", "'.hidden'"),
        ("-rf", "'-rf'"),
        ("=HYPERLINK(1)", "'=HYPERLINK(1)'"),
        ("a b", "'a b'"),
    ],
)
def test_client_names_must_be_safe_file_names(tmp_path, cfg_text, name, shown):
    cfg = yaml.safe_load(cfg_text)
    cfg["data"]["clients"][0]["name"] = name
    line = run_refused(tmp_path, yaml.safe_dump(cfg))
    assert line.startswith(f"error: data.clients[0].name: {shown}")
    assert "is not a usable name" in line and len(line) < 250


def test_ordinary_client_names_pass():
    for name in ("a", "lgg_cs", "site-1", "BUSI.v2", "fedoap+sg", "_pooled", "x" * 64):
        cfg = tiny_config(f"data.clients=[{{name: '{name}', source: synthetic, style: mri}}]")
        assert [c.name for c in cfg.data.clients] == [name]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "-1"], "error: --epochs must be between 1 and 100,000, got -1"),
        (["--epochs", "0"], "error: --epochs must be between 1 and 100,000, got 0"),
        (["--name", "../b"], "error: --name: '../b' is not a usable client name"),
    ],
)
def test_adapt_checks_its_options_before_reading_anything(
    finished_run,  # noqa: F811
    tmp_path,
    args,
    message,
):
    argv = ["--name", "new", "--epochs", "2", *args]
    res = fedoap(
        "adapt", finished_run, "--data", tmp_path / "missing.npz", *argv, "-o", tmp_path / "o"
    )
    assert assert_one_error_line(res).startswith(message)
    assert not (tmp_path / "o").exists()
