"""Every ``fedoap ...`` command in the README and the docs' code blocks parses: its command and
options exist, and the config, benchmark spec or analysis file it names resolves. A config the
reader writes (``-c my-study.yaml``, not in the repository) is the YAML block that the page shows
before the command, and must load as one. Paths it creates or reads from a run (``-o``, a run
folder) are not required to exist here."""

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

DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```([a-z]*)\n(.*?)^```", re.S | re.M)


def documented_commands() -> list[tuple[str, list[str], str | None]]:
    """(where, argv after ``fedoap``, the page's last YAML block before it) for every ``fedoap``
    line of every fenced block."""
    found = []
    for path in DOCS:
        last_yaml = None
        for lang, block in FENCE.findall(path.read_text()):
            if lang == "yaml":
                last_yaml = block
                continue
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip().removeprefix("$ ")
                try:
                    tokens = shlex.split(line, comments=True)
                except ValueError:
                    continue  # not shell (a table, a YAML line)
                while tokens and (tokens[0] == "time" or re.fullmatch(r"\w+=\S*", tokens[0])):
                    tokens = tokens[1:]
                for i, t in enumerate(tokens):  # the command ends where the shell takes over
                    if t in (">", ">>", "|", "&&", ";", "2>&1"):
                        tokens = tokens[:i]
                        break
                if tokens[:1] == ["fedoap"]:
                    # a shell variable of a loop ($seed): any value of its kind parses alike
                    argv = ["0" if t.startswith("$") else t for t in tokens[1:]]
                    found.append((f"{path.name}: {line}", argv, last_yaml))
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


@pytest.mark.parametrize(
    ("argv", "shown_yaml"), [c[1:] for c in COMMANDS], ids=[c[0] for c in COMMANDS]
)
def test_a_documented_command_parses_and_its_files_resolve(argv, shown_yaml, tmp_path):
    try:
        name, params = parse(argv)
    except click.BadParameter as err:
        if "does not exist" in str(err):  # a run folder the reader makes first
            return
        raise
    config = params.get("config") or params.get("spec")
    if config is not None and name in ("run", "config"):
        path = REPO / config
        if not path.exists():  # the reader's own config: the YAML the page shows
            assert shown_yaml is not None, f"{config} is neither in the repository nor shown"
            path = tmp_path / path.name
            path.write_text(shown_yaml)
        load_config(path, list(params.get("overrides") or []))
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
