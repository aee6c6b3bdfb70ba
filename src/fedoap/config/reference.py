"""The configuration reference, generated from the config's sections: one Markdown table per
section (a nested section under its own heading, e.g. ``privacy.dp``), each key with its type,
default, range and meaning (the ``doc`` its field declares, :mod:`fedoap.config.keys`).

    python -m fedoap.config.reference > docs/configuration.md

tests/test_config_reference.py holds the committed reference equal to what this writes now."""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, Literal, NamedTuple

from fedoap.config.identity import EXECUTION_KEYS
from fedoap.config.keys import default_of, doc_of, first_name, old_names, sections_of, since_of
from fedoap.config.ranges import Range
from fedoap.config.schema import Config

INTRO = """\
# Configuration reference

Generated from the config's dataclasses (`src/fedoap/config`) by
`python -m fedoap.config.reference > docs/configuration.md`: edit the `doc` of a key there, never
this file. A run is described by a YAML file of the sections below and by dotted overrides on the
command line, applied after the file, e.g.
`fedoap run -c configs/quickstart.yaml -o runs/x federation.rounds=3`
(`fedoap config -c FILE [overrides]` prints the resolved config). A key left out keeps its
default; an unknown key, a wrong type or a value out of its range fails with an error naming the
dotted key, before any data is read. A range applies to each item of a list. A renamed key is
still read under its earlier name. Execution settings decide where and how fast a run executes,
not what it computes, so they are not part of a run's identity (its digest, by which a resume and
a benchmark's cache match runs).
"""


class Key(NamedTuple):
    """One row of the reference: a key (dotted) and what the reference says of it."""

    name: str
    type: str
    default: str
    range: str
    meaning: str


class Section(NamedTuple):
    """One table of the reference: a section's dotted name (empty for the top level), what it
    is, its nested sections and its keys."""

    name: str
    doc: str
    nested: tuple[str, ...]
    keys: tuple[Key, ...]


def sections(
    cls: type = Config, name: str = "", first: str = "", doc: str = ""
) -> Iterator[Section]:
    """The sections of dataclass ``cls`` (dotted ``name``, introduced as ``first``), the section
    first, then its nested sections in the order of their fields."""
    hints = typing.get_type_hints(cls)
    keys, nested = [], []
    prefix, first_prefix = (f"{name}.", f"{first}.") if name else ("", "")
    for f in dataclasses.fields(cls):
        inner = sections_of(hints[f.name])
        if inner is None:
            keys.append(describe(f, hints[f.name], prefix, first_prefix))
        else:
            nested.append((f, inner))
    names = tuple(f"{prefix}{f.name}{suffix.rstrip('.')}" for f, (_, suffix) in nested)
    yield Section(name, doc, names, tuple(keys))
    for f, (section, suffix) in nested:
        yield from sections(
            section,
            f"{prefix}{f.name}{suffix.rstrip('.')}",
            f"{first_prefix}{first_name(f)}{suffix.rstrip('.')}",
            doc_of(f),
        )


def describe(f: dataclasses.Field[Any], tp: Any, prefix: str, first_prefix: str) -> Key:
    """The row of field ``f`` (annotated ``tp``) of the section at dotted ``prefix``."""
    meaning = [doc_of(f)]
    meaning += [f"Formerly `{prefix}{old}`." for old in old_names(f)]
    if since_of(f) > 1:
        meaning.append(f"Added in digest version {since_of(f)}.")
    if f"{first_prefix}{first_name(f)}" in EXECUTION_KEYS:
        meaning.append("Execution setting: not part of a run's identity.")
    default = default_of(f)
    rng: Range | None = f.metadata.get("range")
    return Key(
        name=f"{prefix}{f.name}",
        type=type_name(tp),
        default="required" if default is dataclasses.MISSING else f"`{value_text(default)}`",
        range="" if rng is None else range_text(rng, each=_is_list(tp)),
        meaning=" ".join(m for m in meaning if m),
    )


def type_name(tp: Any) -> str:
    """A key's annotation as a reader writes it: ``int``, ``list[str]``, ``one of a|b``,
    ``float or null``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        name = " or ".join(type_name(a) for a in args if a is not type(None))
        return f"{name} or null" if type(None) in args else name
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list[{type_name(args[0])}]"
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if origin in (Mapping, dict) or tp in (Mapping, dict):
        return "mapping"
    return str(getattr(tp, "__name__", tp))


def _is_list(tp: Any) -> bool:
    """Whether annotation ``tp`` is a list (a tuple), or an optional one."""
    return any(typing.get_origin(t) is tuple for t in (tp, *typing.get_args(tp)))


def value_text(value: Any) -> str:
    """A default as it is written in YAML (flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {value_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return value or '""'
    return repr(value)


def range_text(rng: Range, each: bool = False) -> str:
    """``0 .. 1``, ``> 0``, ``>= 0, < 0.5``; ``each`` for a list, whose items it bounds."""
    if rng.ge is not None and rng.le is not None:
        text = f"{number_text(rng.ge)} .. {number_text(rng.le)}"
    else:
        lower = [
            f"{op} {number_text(v)}" for op, v in ((">=", rng.ge), (">", rng.gt)) if v is not None
        ]
        upper = [
            f"{op} {number_text(v)}" for op, v in (("<=", rng.le), ("<", rng.lt)) if v is not None
        ]
        text = ", ".join(lower + upper)
    return f"each {text}" if each and text else text


def number_text(v: float) -> str:
    """A bound: an integer without a fraction, a large power of two (or one less) as one."""
    if not float(v).is_integer():
        return f"{v:g}"
    n = int(v)
    for k in range(20, 64):
        if n == 2**k:
            return f"2^{k}"
        if n == 2**k - 1:
            return f"2^{k} - 1"
    return str(n)


def _cell(text: str) -> str:
    """Text that stays in one table cell: a ``|`` would end it."""
    return text.replace("\n", " ").replace("|", "\\|")


def render() -> str:
    """The whole reference, in Markdown."""
    out = [INTRO]
    for s in sections():
        out.append(f"## {f'`{s.name}`' if s.name else 'Top level'}\n")
        intro = [s.doc] if s.doc else []
        if s.name.endswith("[]"):
            intro.append("A list: each entry has the keys below.")
        if s.nested:
            intro.append("Its sections: " + ", ".join(f"`{n}`" for n in s.nested) + ".")
        if intro:
            out.append(" ".join(intro) + "\n")
        if s.keys:
            out.append("| key | type | default | range | meaning |")
            out.append("|---|---|---|---|---|")
            for k in s.keys:
                cells = (f"`{k.name}`", k.type, k.default, k.range, k.meaning)
                out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
            out.append("")
    return "\n".join(out)


def main() -> None:
    """Write the reference to standard output."""
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
