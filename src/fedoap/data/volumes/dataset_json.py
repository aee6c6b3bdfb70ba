"""``dataset.json`` of the nnU-Net v2 and Decathlon layouts: its channels, its labels, and which
of the two layouts it declares. Every error names the file and the key."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedoap.data.errors import DataError
from fedoap.errors import shown

#: Largest dataset.json read: a Decathlon task's, listing a thousand cases, is under 200 KB.
MAX_DATASET_JSON_BYTES = 16 * 2**20

#: A channel index or label value as dataset.json writes it: a plain non-negative integer.
INDEX = re.compile(r"[0-9]{1,9}")


def _read_dataset_json(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if not path.is_file():
        raise DataError(f"{root}: no dataset.json (the nnU-Net and Decathlon layouts need one)")
    try:
        if path.stat().st_size > MAX_DATASET_JSON_BYTES:
            raise DataError(
                f"{path}: {path.stat().st_size:,} bytes, more than a dataset.json holds "
                f"({MAX_DATASET_JSON_BYTES:,} at most)"
            )
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read as JSON: {err}") from None
    except RecursionError:
        raise DataError(f"{path}: cannot read as JSON: nested too deeply") from None
    except ValueError as err:  # an integer past Python's 4300-digit conversion limit
        raise DataError(f"{path}: cannot read as JSON: {err}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: must hold a JSON object")
    return meta


def _channel_names(meta: Mapping[str, Any], key: str, path: Path) -> dict[int, str]:
    """``{"0": "FLAIR", ...}`` of dataset.json's ``key`` as {index: name}."""
    raw = meta.get(key)
    if not isinstance(raw, Mapping) or not raw:
        raise DataError(f"{path}: '{key}' must map channel indices to names, got {shown(raw)}")
    out = {}
    for k, v in raw.items():
        if INDEX.fullmatch(str(k)) is None:
            raise DataError(f"{path}: '{key}' key {str(k)[:40]!r} is not a channel index")
        if not isinstance(v, str):
            raise DataError(f"{path}: {key}.{k}: a channel name must be a string, got {shown(v)}")
        out[int(k)] = v
    return dict(sorted(out.items()))


#: The ``dataset.json`` key that names each layout's channels.
CHANNEL_KEYS = {"nnunet": "channel_names", "msd": "modality"}


def dataset_channel(
    root: Path, source: str, channel: int | str | None
) -> tuple[dict[str, Any], Path, dict[int, str], int, str]:
    """(dataset.json, its path, its channels {index: name}, the chosen index and name)."""
    meta = _read_dataset_json(root)
    jpath = root / "dataset.json"
    names = _channel_names(meta, CHANNEL_KEYS[source], jpath)
    index, name = choose_channel(names, channel, str(jpath))
    return meta, jpath, names, index, name


def choose_channel(
    names: Mapping[int, str], wanted: int | str | None, where: str
) -> tuple[int, str]:
    """(index, name) of the channel ``wanted`` names (or indexes); errors list the channels."""
    shown = ", ".join(f"{i}: {n[:40]}" for i, n in list(names.items())[:20])
    if wanted is None:
        if len(names) == 1:
            return next(iter(names.items()))
        raise DataError(
            f"{where}: the dataset has {len(names)} channels ({shown}); set the client's channel "
            "to the one to train on"
        )
    if isinstance(wanted, int):
        if wanted not in names:
            raise DataError(f"{where}: channel {wanted} does not exist; channels: {shown}")
        return wanted, names[wanted]
    exact = [i for i, n in names.items() if n == wanted]
    loose = [i for i, n in names.items() if n.lower() == wanted.lower()]
    hits = exact or loose
    if len(hits) != 1:
        raise DataError(f"{where}: no channel named {wanted!r}; channels: {shown}")
    return hits[0], names[hits[0]]


def nnunet_labels(meta: Mapping[str, Any], path: Path) -> dict[str, tuple[int, ...]]:
    """nnU-Net v2 ``labels``: name -> value, or name -> [values] (region-based training)."""
    raw = meta.get("labels")
    if not isinstance(raw, Mapping) or not raw:
        raise DataError(f"{path}: 'labels' must map label names to values, got {shown(raw)}")
    out = {}
    for name, value in raw.items():
        values = value if isinstance(value, list) else [value]
        if not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31 for v in values
        ):
            raise DataError(
                f"{path}: labels.{str(name)[:40]}: must be a label value from 0 to 2^31-1, got "
                f"{shown(value)}"
            )
        out[str(name)] = tuple(values)
    return out


def msd_labels(meta: Mapping[str, Any], path: Path) -> dict[str, tuple[int, ...]]:
    """Decathlon ``labels``: ``{"0": "background", "1": "edema"}`` as name -> (value,)."""
    raw = meta.get("labels")
    if not isinstance(raw, Mapping) or not raw:
        raise DataError(f"{path}: 'labels' must map label values to names, got {shown(raw)}")
    out: dict[str, tuple[int, ...]] = {}
    for value, name in raw.items():
        if INDEX.fullmatch(str(value)) is None:
            raise DataError(f"{path}: labels key {str(value)[:40]!r} is not a label value")
        if not isinstance(name, str):
            raise DataError(
                f"{path}: labels.{value}: a label name must be a string, got {shown(name)}"
            )
        out[name] = (int(value),)
    return out


def detect_layout(path: Path) -> str | None:
    """``nnunet`` or ``msd`` for a folder whose ``dataset.json`` says which; else None."""
    if not (path / "dataset.json").is_file():
        return None
    meta = _read_dataset_json(path)
    if "channel_names" in meta:
        return "nnunet"
    if "modality" in meta:
        return "msd"
    return None
