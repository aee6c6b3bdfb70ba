"""Where fedoap's log records go.

Every module logs to ``logging.getLogger(__name__)``, under the ``fedoap`` logger: notes about
the data and progress at INFO, what a user should look at (a lost site, a refused upload, a
setting that does nothing here) at WARNING. A library user routes or silences them like any
other logger's; the command line shows them through rich (``fedoap.cli.main``), and the Flower
apps, which run in processes of their own, write them with their level to the process's output,
which Flower keeps in its logs (:func:`log_to_stream`).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

FORMAT = "%(levelname)s %(name)s: %(message)s"


def log_to_stream(stream: TextIO | None = None) -> None:
    """Write the ``fedoap`` logger's records, INFO and above, with their level to ``stream``
    (the process's standard output by default), once per process."""
    log = logging.getLogger("fedoap")
    if any(getattr(h, "fedoap_stream", False) for h in log.handlers):
        return
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.fedoap_stream = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
