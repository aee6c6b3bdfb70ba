"""The configuration reference (fedoap.config.reference, docs/configuration.md): every key says
what it means, the committed reference is what the generator writes now, and every key it lists
is a key of the config."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import Any

from fedoap.config import Config
from fedoap.config.keys import doc_of, schema_keys, sections_of
from fedoap.config.reference import render, sections
from tests.conftest import TINY, tiny_config

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
#: A key's row in the reference: its dotted name, in backticks, in the first column.
ROW = re.compile(r"^\| `([^`]+)` \|", re.MULTILINE)


def listed_keys() -> list[str]:
    return ROW.findall(REFERENCE.read_text())


def test_every_key_says_what_it_means():
    # Sections (data.split, data.clients) included: their doc opens their table.
    names = [name for name, _, _ in schema_keys(Config)]
    assert len(names) > 100  # the walk reaches the nested sections and data.clients[]
    missing = [name for name, _, f in schema_keys(Config) if not doc_of(f).strip()]
    assert not missing, f"config keys without a doc (key(..., doc=...)): {missing}"


def test_the_committed_reference_is_what_the_generator_writes():
    assert REFERENCE.read_text() == render(), (
        "docs/configuration.md is stale: python -m fedoap.config.reference > docs/configuration.md"
    )


def test_the_reference_lists_every_key_once():
    hints = {}  # dotted section prefix -> its type hints
    schema = []
    for name, _, f in schema_keys(Config):
        parent = name[: len(name) - len(f.name)]
        owner = hints.setdefault(parent, typing.get_type_hints(type_of(parent)))
        if sections_of(owner[f.name]) is None:  # a key, not a section
            schema.append(name)
    listed = listed_keys()
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(schema)
    titles = [s.name for s in sections()]
    assert {"privacy.dp", "model.kv", "data.clients[]", "data.clients[].volume"} <= set(titles)


def _field(cls: type, dotted: str, key: str = "") -> dataclasses.Field[Any]:
    """The dataclass field that dotted key ``a.b[].c`` names under ``cls``; fails naming it."""
    key = key or dotted
    head, _, rest = dotted.partition(".")
    name = head.removesuffix("[]")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert name in fields, f"{key}: {cls.__name__} has no key {name}"
    if not rest:
        return fields[name]
    inner = sections_of(typing.get_type_hints(cls)[name])
    suffix = "[]." if head.endswith("[]") else "."
    assert inner is not None and inner[1] == suffix, f"{key}: {head} is not a section"
    return _field(inner[0], rest, key)


def type_of(prefix: str) -> type:
    """The dataclass of the section at dotted ``prefix``: ``""``, ``data.``, ``data.clients[].``."""
    cls: type = Config
    for part in prefix.rstrip(".").split(".") if prefix else []:
        inner = sections_of(typing.get_type_hints(cls)[part.removesuffix("[]")])
        assert inner is not None
        cls = inner[0]
    return cls


def _value(plain: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        plain = plain[part]
    return plain


def test_every_listed_key_is_a_key_of_the_config():
    base = tiny_config()
    plain = base.to_dict()
    keys = listed_keys()
    assert len(keys) > 100
    for dotted in keys:
        _field(Config, dotted)
        if "[]." in dotted:
            # A key of every client: each client of the tiny config given it explicitly.
            _, rest = dotted.split("[].", 1)
            data = copy.deepcopy(TINY["data"])
            for given, client in zip(data["clients"], plain["data"]["clients"], strict=True):
                node = given
                *parents, last = rest.split(".")
                for part in parents:
                    node = node.setdefault(part, {})
                node[last] = _value(client, rest)
            got = tiny_config(data=data)
        else:
            # Set to its value in the tiny config: the same config back, read under this name.
            got = tiny_config(f"{dotted}={json.dumps(_value(plain, dotted))}")
        assert got == base, dotted
