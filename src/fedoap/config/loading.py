"""Reading a config: YAML (bounded, duplicate keys refused), dotted overrides, and the typed
build of the dataclasses, each error naming the dotted key or the file. A key given under a name
it had before (its field's ``was``, :mod:`fedoap.config.keys`) is read under its current name,
with a note (:class:`RenamedKeyWarning`): old configs and run folders keep loading."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from fedoap.config.keys import old_names, renamed_keys
from fedoap.config.ranges import _short
from fedoap.config.schema import Config
from fedoap.config.validation import validate
from fedoap.errors import ConfigError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{key}: expected a mapping of {_type_name(tp)} fields, got {value!r}"
            )
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_short(value)}")
        if not -(2**63) <= value < 2**63:
            raise ConfigError(f"{key}: {_short(value)} is out of range (a 64-bit integer)")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_short(value)}")
        try:
            out = float(value)
        except OverflowError:  # an int beyond the float range
            out = math.inf
        if not math.isfinite(out):
            raise ConfigError(f"{key}: must be a finite number, got {_short(value)}")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_short(value)}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")  # pragma: no cover


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        raise ConfigError(f"{prefix or '<root>'}: config keys must be names, got {odd[0]!r}")
    data = _current_names(cls, data, prefix)
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys under "
            f"'{prefix.rstrip('.') or '<root>'}' are: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


class RenamedKeyWarning(FutureWarning):
    """A config key given under a name it had before: it is read under its current name."""


def _note_renamed(old: str, new: str) -> None:
    # Shown once per key and process: a benchmark reads hundreds of old run folders.
    warnings.warn(
        f"config key {old} is now called {new}: read as {new}", RenamedKeyWarning, stacklevel=3
    )


def _current_names(cls: type, data: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
    """``data`` (a section of dataclass ``cls``) with each key given under an earlier name
    moved to its current name; the same key under both names is an error."""
    moved: dict[str, Any] | None = None
    for f in dataclasses.fields(cls):
        for old in old_names(f):
            if old not in data:
                continue
            if f.name in data or (moved is not None and f.name in moved):
                raise ConfigError(
                    f"{prefix}{old} and {prefix}{f.name}: the same key, under its earlier and "
                    f"its current name; give it once, as {prefix}{f.name}"
                )
            moved = dict(data) if moved is None else moved
            moved[f.name] = moved.pop(old)
            _note_renamed(f"{prefix}{old}", f"{prefix}{f.name}")
    return data if moved is None else moved


def _current_key(parts: list[str], schema: type) -> list[str]:
    """An override's dotted key with each part given under an earlier name made current."""
    renamed = renamed_keys(schema)
    current: list[str] = []
    for part in parts:
        new = renamed.get(".".join([*current, part]))
        current.append(part if new is None else new.rsplit(".", 1)[-1])
    if current != parts:
        _note_renamed(".".join(parts), ".".join(current))
    return current


#: Most nodes a YAML document may expand to once its aliases are resolved. A config has a few
#: hundred; nine levels of nine aliases ("billion laughs") expand to 9^9 and took 23 GB.
MAX_YAML_NODES = 100_000


def load_yaml(text: str, where: str, max_nodes: int = MAX_YAML_NODES) -> Any:
    """``yaml.safe_load`` that first bounds the document's size with its aliases expanded.

    Aliases are resolved only when Python objects are built; the node graph is composed
    without expanding them, so its expanded size is counted (each shared node once per use)
    and a bomb is refused before it costs memory. Errors name ``where``."""
    loader = None
    try:
        # The reader checks every character as the loader is built: a NUL byte fails here.
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, where, max_nodes)
        return loader.construct_document(node)
    except ConfigError:
        raise
    except yaml.reader.ReaderError as err:
        code = err.character if isinstance(err.character, int) else ord(err.character)
        line = text.count("\n", 0, err.position) + 1
        raise ConfigError(
            f"{where}: not valid YAML: character U+{code:04X} at line {line} is not allowed"
        ) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = err.problem or err.context or "cannot parse"
        raise ConfigError(f"{where}: not valid YAML: {what}{at}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None
    except ValueError as err:  # e.g. an integer past Python's 4300-digit conversion limit
        what = "a number has more than 4300 digits" if "digits" in str(err) else str(err)
        raise ConfigError(f"{where}: not valid YAML: {what}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _expanded_size(root: yaml.Node, where: str, limit: int) -> int:
    sizes: dict[int, int] = {}  # id(node) -> nodes it expands to
    open_: set[int] = set()  # nodes being counted: meeting one again is a recursive alias

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise ConfigError(f"{where}: a YAML anchor contains an alias to itself")
        open_.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            _refuse_duplicate_keys(node, where)
            total += sum(size(k) + size(v) for k, v in node.value)
        open_.discard(key)
        if total > limit:
            raise ConfigError(
                f"{where}: the YAML expands to more than {limit:,} nodes once its aliases "
                "(*name) are resolved; a config needs a few hundred (an alias bomb?)"
            )
        sizes[key] = total
        return total

    return size(root)


def _refuse_duplicate_keys(node: yaml.MappingNode, where: str) -> None:
    """YAML keeps the last of two equal keys; in a config that hides the first silently."""
    seen: set[str] = set()
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            continue
        if key.value in seen:
            mark = key.start_mark
            raise ConfigError(
                f"{where}: duplicate key {key.value[:80]!r} at line {mark.line + 1}, column "
                f"{mark.column + 1} (YAML would keep only the last one)"
            )
        seen.add(key.value)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part")
    value = load_yaml(raw, f"override {key}") if raw.strip() else ""
    # YAML reads 3e-4 as a string (it wants 3.0e-4); be forgiving for numbers.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value) if any(c in value for c in ".eE") else int(value)
    return parts, value


def apply_overrides(
    data: dict[str, Any], overrides: Sequence[str], schema: type = Config
) -> dict[str, Any]:
    """Apply dotted overrides to a nested plain dict of dataclass ``schema`` (in a copy). A key
    given under an earlier name is set under its current one, and replaces the key under any
    name (an old file's ``federation.byzantine`` by ``federation.num_byzantine=0``)."""
    earlier: dict[str, list[str]] = {}  # current dotted name -> its earlier last parts
    for old, new in renamed_keys(schema).items():
        earlier.setdefault(new, []).append(old.rsplit(".", 1)[-1])
    out = _copy_tree(data)
    for text in overrides:
        parts, value = parse_override(text)
        parts = _current_key(parts, schema)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        for old in earlier.get(".".join(parts), ()):
            node.pop(old, None)
        node[parts[-1]] = value
    return out


def _copy_tree(node: Any) -> Any:
    """A copy of the mappings and lists of a loaded YAML document (scalars are shared)."""
    if isinstance(node, dict):
        return {k: _copy_tree(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_copy_tree(v) for v in node]
    return node


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read the config file: {err}") from None
        loaded = load_yaml(text, str(path))
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded
    data = apply_overrides(data, overrides)
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    from fedoap.fileio import atomic_write_text

    atomic_write_text(path, cfg.to_yaml())
