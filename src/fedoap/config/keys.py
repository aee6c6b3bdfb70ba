"""A config key's meaning and history, declared on its schema field beside its default: what
the key does (``doc``, shown by the configuration reference, :mod:`fedoap.config.reference`),
the digest version that introduced it (``since``; :mod:`fedoap.config.identity`) and the names
it had before (``was``), which old files and overrides may still use
(:mod:`fedoap.config.loading` reads them as the new name).

    # renamed: files and overrides that say federation.byzantine still load, and hash as before
    num_byzantine: int = ranged(1, ge=0, le=100_000, was="byzantine", doc="...")
    # a key added after digest version 1: left out of the digest while at its default
    warmup: Literal["none", "linear"] = key("none", since=2, doc="...")

None of it is part of a run's identity: a digest hashes values, never field metadata.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any

#: Field metadata: the digest version that introduced the key (absent: version 1).
SINCE = "since"
#: Field metadata: the key's earlier names, oldest first (absent: never renamed).
WAS = "was"
#: Field metadata: what the key means, one or a few sentences of Markdown (absent: undocumented).
DOC = "doc"

_MISSING: Any = dataclasses.MISSING


def key(
    default: Any = _MISSING,
    *,
    default_factory: Callable[[], Any] = _MISSING,
    since: int = 1,
    was: str | tuple[str, ...] = (),
    doc: str = "",
    metadata: Mapping[str, Any] | None = None,
) -> Any:
    """A dataclass field with its meaning and history: ``doc``, what the key does; ``since``,
    the digest version that introduced it (a key added after version 1 needs a default, the
    value runs made before it had), and ``was``, the name or names it had before, oldest
    first."""
    meta = dict(metadata or {})
    if doc:
        meta[DOC] = doc
    if since != 1:
        meta[SINCE] = since
    olds = (was,) if isinstance(was, str) else tuple(was)
    if olds:
        meta[WAS] = olds
    options: dict[str, Any] = {"metadata": meta}
    if default_factory is not _MISSING:
        options["default_factory"] = default_factory
    elif default is not _MISSING:
        options["default"] = default
    return dataclasses.field(**options)


def since_of(f: dataclasses.Field[Any]) -> int:
    """The digest version that introduced the key of field ``f``."""
    return int(f.metadata.get(SINCE, 1))


def doc_of(f: dataclasses.Field[Any]) -> str:
    """What the key of field ``f`` means (empty when it declares nothing)."""
    return str(f.metadata.get(DOC, ""))


def old_names(f: dataclasses.Field[Any]) -> tuple[str, ...]:
    """The names the key of field ``f`` had before, oldest first."""
    return tuple(f.metadata.get(WAS, ()))


def first_name(f: dataclasses.Field[Any]) -> str:
    """The name the key of field ``f`` was introduced under: a digest hashes it by that name."""
    olds = old_names(f)
    return olds[0] if olds else f.name


def default_of(f: dataclasses.Field[Any]) -> Any:
    """The default value of field ``f`` (``dataclasses.MISSING`` when it has none)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def sections_of(tp: Any) -> tuple[type, str] | None:
    """For a field annotated ``tp``: the dataclass it holds and the dotted suffix of its keys
    (``.`` for a section, ``[].`` for a list of them, as ``data.clients[].name``); None for a
    plain value."""
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        is_section = isinstance(item, type) and dataclasses.is_dataclass(item)
        return (item, "[].") if is_section else None
    for arg in (tp, *typing.get_args(tp)):  # a section, or an optional one (X | None)
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg, "."
    return None


def schema_keys(
    cls: type, prefix: str = "", first_prefix: str = ""
) -> Iterator[tuple[str, str, dataclasses.Field[Any]]]:
    """``(dotted name, dotted first name, field)`` of every key under dataclass ``cls``, a
    section before its keys. A first name is the one the key (and its sections) had when it
    was introduced, as a digest hashes it."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name, first = f"{prefix}{f.name}", f"{first_prefix}{first_name(f)}"
        yield name, first, f
        inner = sections_of(hints[f.name])
        if inner is not None:
            section, suffix = inner
            yield from schema_keys(section, name + suffix, first + suffix)


@functools.cache
def renamed_keys(cls: type) -> Mapping[str, str]:
    """``{earlier dotted name: current name}`` of every renamed key under dataclass ``cls``,
    e.g. ``{"federation.byzantine": "federation.num_byzantine"}``. The section part of an
    earlier name is current: a section renamed too is looked up first."""
    out = {}
    for name, _, f in schema_keys(cls):
        parent = name[: len(name) - len(f.name)]
        for old in old_names(f):
            out[parent + old] = name
    return out
