"""fedoap's own version, as installed (``fedoap --version``, ``summary.json``, ONNX sidecars)."""

from __future__ import annotations


def fedoap_version() -> str:
    """The installed distribution's version; ``unknown`` for a source tree on PYTHONPATH."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedoap")
    except PackageNotFoundError:
        return "unknown"
