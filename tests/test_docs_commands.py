"""Every ``fedoap ...`` command in the README and the docs' code blocks parses: its command and
options exist, and the config, benchmark spec or analysis file it names resolves. Paths it
creates or reads from a run (``-o``, a run folder) are not required to exist here."""

from __future__ import annotations

import re
import shlex

import click
import pytest
import typer

from fedoap.bench import load_spec
from fedoap.cli.main import app, expand_multi_value
from fedoap.config import load_config
from fedoap.report import load_analysis
from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.S | re.M)


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after ``fedoap``) for every ``fedoap`` line of every fenced block."""
    found = []
    for path in DOCS:
        for block in FENCE.findall(path.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip().removeprefix("$ ")
                try:
                    tokens = shlex.split(line, comments=True)
                except ValueError:
                    continue  # not shell (a table, a YAML line)
                while tokens and (tokens[0] == "time" or re.fullmatch(r"\w+=\S*", tokens[0])):
                    tokens = tokens[1:]
                if tokens[:1] == ["fedoap"]:
                    # a shell variable of a loop ($seed): any value of its kind parses alike
                    argv = ["0" if t.startswith("$") else t for t in tokens[1:]]
                    found.append((f"{path.name}: {line}", argv))
    return found


COMMANDS = documented_commands()


def parse(argv: list[str]) -> tuple[str, dict]:
    """The command's name and parameters as the command line would parse them (nothing runs)."""
    group = typer.main.get_command(app)
    ctx = group.make_context("fedoap", expand_multi_value(argv))
    command: click.Command = group
    name = ""
    rest = [*ctx.protected_args, *ctx.args]
    while isinstance(command, click.Group):
        name, command, rest = command.resolve_command(ctx, rest)
        assert command is not None and name is not None
        ctx = command.make_context(name, rest, parent=ctx)
        rest = [*ctx.protected_args, *ctx.args]
    return name, ctx.params


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 10, COMMANDS  # the scan finds the README's own examples


@pytest.mark.parametrize("argv", [c[1] for c in COMMANDS], ids=[c[0] for c in COMMANDS])
def test_a_documented_command_parses_and_its_files_resolve(argv):
    try:
        name, params = parse(argv)
    except click.BadParameter as err:
        if "does not exist" in str(err):  # a run folder the reader makes first
            return
        raise
    config = params.get("config") or params.get("spec")
    if config is not None and name == "run":
        load_config(REPO / config, list(params.get("overrides") or []))
    if config is not None and name == "bench":
        load_spec(REPO / config)
    if params.get("analysis") is not None:
        load_analysis(REPO / params["analysis"])


def test_a_wrong_option_or_key_is_caught():
    with pytest.raises(click.NoSuchOption):
        parse(["run", "-c", "configs/quickstart.yaml", "--rounds", "3"])
    name, params = parse(["run", "-c", "configs/quickstart.yaml", "federation.round=3"])
    with pytest.raises(Exception, match="federation.round"):
        load_config(REPO / params["config"], list(params["overrides"]))
