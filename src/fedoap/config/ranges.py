"""Numeric ranges of config keys: every int and float key declares one (:func:`ranged`), and
:func:`check_ranges` checks them all with the dotted key in the error."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from fedoap.config.keys import key
from fedoap.errors import ConfigError, shown


@dataclass(frozen=True)
class Range:
    """The values a numeric config key accepts (``None`` passes: it means "unset")."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def admits(self, v: float) -> bool:
        return not (
            (self.ge is not None and v < self.ge)
            or (self.gt is not None and v <= self.gt)
            or (self.le is not None and v > self.le)
            or (self.lt is not None and v >= self.lt)
        )

    def describe(self) -> str:
        def num(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else f"{v:g}"

        parts = []
        if self.ge is not None:
            parts.append(f">= {num(self.ge)}")
        if self.gt is not None:
            parts.append(f"> {num(self.gt)}")
        if self.le is not None:
            parts.append(f"<= {num(self.le)}")
        if self.lt is not None:
            parts.append(f"< {num(self.lt)}")
        return " and ".join(parts)


def ranged(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    since: int = 1,
    was: str | tuple[str, ...] = (),
    doc: str = "",
) -> Any:
    """A dataclass field whose value must lie in a range (checked by :func:`check_ranges`, with
    the dotted key in the error). Every int and float key of a config or of a method's options
    declares one (tests/test_config.py checks that none is missing). ``doc``, ``since`` and
    ``was``: the key's meaning and history (:func:`fedoap.config.keys.key`)."""
    rng = Range(ge=ge, gt=gt, le=le, lt=lt)
    return key(default, since=since, was=was, doc=doc, metadata={"range": rng})


def check_ranges(obj: Any, prefix: str = "") -> None:
    """Check every ranged field of dataclass ``obj`` (recursively); errors name the dotted key."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        rng: Range | None = f.metadata.get("range")
        if rng is not None:
            # A number, or each number of a tuple (``percentiles: (0.5, 99.5)``); a string
            # (a channel's name) has no range.
            items = value if isinstance(value, tuple) else (value,)
            for item in items:
                numeric = isinstance(item, (int, float)) and not isinstance(item, bool)
                if numeric and not rng.admits(item):
                    raise ConfigError(f"{key}: must be {rng.describe()}, got {value!r}")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_ranges(value, f"{key}.")
        elif isinstance(value, tuple):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item) and not isinstance(item, type):
                    check_ranges(item, f"{key}[{i}].")


def _short(value: Any, limit: int = 60) -> str:
    """:func:`fedoap.errors.shown`, and a huge integer by its number of digits."""
    if isinstance(value, int) and abs(value) >= 10**40:
        # its repr is useless in a message, and past 4300 digits Python refuses to make it
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    return shown(value, limit)
