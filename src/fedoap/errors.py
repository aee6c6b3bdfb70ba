"""The project's error types.

Everything a user can cause (a bad config, bad data, a run folder that exists, a tampered
checkpoint, training that diverged, a GPU that ran out of memory) raises a subclass of
:class:`FedoapError`. The command line prints those as one line and exits with code 2; any other
exception is a bug in fedoap and keeps its traceback.
"""

from __future__ import annotations

from typing import Any


class FedoapError(Exception):
    """Something the user can fix. The message names the key, file or client at fault."""


class ConfigError(FedoapError, ValueError):
    """A configuration value is missing, unknown or of the wrong type. The message names the key."""


class CheckpointError(FedoapError, ValueError):
    """A checkpoint is missing, unreadable, written by another config, or fails its digest."""


class OutputError(FedoapError, OSError):
    """An output location cannot be used (it is a file, or not writable), or outputs collide."""


class DivergedError(FedoapError, ArithmeticError):
    """Training produced a non-finite loss or non-finite weights.

    ``client``, ``round`` and ``stage`` say where (None where the raiser does not know);
    ``step`` is the local optimiser step, counted from 1, where the loss first was not finite;
    ``detail`` is what went wrong without the where and the advice (default: the message).
    """

    def __init__(
        self,
        message: str,
        *,
        client: str | None = None,
        round: int | None = None,
        stage: str | None = None,
        step: int | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.detail = message if detail is None else detail
        self.client, self.round, self.stage, self.step = client, round, stage, step


class NotFoundError(FedoapError, FileNotFoundError):
    """A file or folder the user named (a run, a results folder, a tool) does not exist."""


class FederationError(FedoapError, RuntimeError):
    """A federated run on Flower failed (a site's error, e.g. divergence, fails its round)."""


class UnsafeNameError(FedoapError, ValueError):
    """A name that would become part of a file name cannot be one (``../x``, ``a/b``)."""


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters so that the message stays
    one readable line (a config or dataset.json value can be megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
