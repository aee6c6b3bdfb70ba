"""fedoap logs through ``logging``: a library user routes or silences it, the command line shows
it with its level."""

from __future__ import annotations

import logging

import pytest
from typer.testing import CliRunner

from fedoap.api import run_experiment
from fedoap.cli.main import app
from fedoap.config import save_config
from tests.conftest import tiny_config

FLOWER_ONLY = "federation.round_timeout_s=30"


@pytest.fixture(autouse=True)
def library_logging():
    """The ``fedoap`` logger as a library user finds it: no handler of the command line's (a
    command run earlier in this process adds one)."""
    log = logging.getLogger("fedoap")
    handlers, level = log.handlers[:], log.level
    log.handlers.clear()
    log.setLevel(logging.NOTSET)
    yield
    log.handlers[:] = handlers
    log.setLevel(level)


def test_a_run_logs_its_warnings_and_notes_and_prints_nothing(tmp_path, caplog, capsys):
    cfg = tiny_config("federation.rounds=1", "finetune.epochs=0", FLOWER_ONLY)
    with caplog.at_level(logging.INFO, logger="fedoap"):
        run_experiment(cfg, tmp_path / "run", progress=False)
    warned = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and "apply to Flower runs only" in r.getMessage()
    ]
    assert [r.name for r in warned] == ["fedoap.federation.runner"]
    assert capsys.readouterr().out == ""  # nothing printed past the logger


def test_a_silenced_logger_silences_the_run(tmp_path, caplog):
    cfg = tiny_config("federation.rounds=1", "finetune.epochs=0", FLOWER_ONLY)
    log = logging.getLogger("fedoap")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with caplog.at_level(logging.ERROR, logger="fedoap"):
            run_experiment(cfg, tmp_path / "run", progress=False)
    finally:
        log.setLevel(level)
    assert [r for r in caplog.records if r.name.startswith("fedoap")] == []


def test_the_command_line_shows_warnings_with_their_level(tmp_path):
    cfg = tmp_path / "c.yaml"
    save_config(tiny_config("federation.rounds=1", "finetune.epochs=0"), cfg)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["run", "-c", str(cfg), "-o", str(out), "--quiet", FLOWER_ONLY]
    )
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "apply to Flower runs only" in x)
    assert "WARNING" in line
