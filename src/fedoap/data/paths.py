"""Where a client's data lies: its configured path, resolved against ``data.root``."""

from __future__ import annotations

from pathlib import Path


def resolve_path(root: str, path: str) -> Path:
    """``path`` with ``~`` expanded; a relative one lies under ``root`` (``data.root``)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(root).expanduser() / p
