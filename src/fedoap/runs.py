"""The run folder: one layout for every run, whatever the method or runtime.

::

    RUN_DIR/
      config.yaml                 resolved config (all a resume needs)
      metrics.csv                 one row per round (or fine-tuning epoch) per client
      summary.json                final per-client test metrics, params, comm, time
      splits.json                 image names of each client's train/val/test split
      test_cases.csv              each client's test scores per case (patient, video)
      checkpoints/last.safetensors    resume state, rewritten atomically after every round
      checkpoints/best/<client>.safetensors   each client's validation-selected model
      plots/*.png
      .fedoap.lock                held by the process writing the folder; gone when it ends

One process at a time writes a run folder: :meth:`RunDir.lock` holds the folder's lock file
(``flock``, released by the kernel if the process dies) for a run's whole life, and a second
``fedoap run``, ``--resume`` or ``evaluate`` of the same folder stops with
:class:`RunInUseError` before it touches anything.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedoap.errors import FedoapError, NotFoundError
from fedoap.fileio import (
    TMP_SUFFIX,
    LockedError,
    acquire_lock,
    atomic_write_text,
    release_lock,
)

#: The run folder's lock file (:meth:`RunDir.lock`); removed when its holder releases it, left
#: behind only by a killed process (then locked again by the next, and ignored as content).
LOCK_NAME = ".fedoap.lock"

METRIC_FIELDS = [
    "round",
    "stage",
    "client",
    "sampled",
    "train_loss",
    "val_dice",
    "val_case_dice",
    "best",
    "seconds",
    "refused",  # the server's reason for refusing the site's upload of that round, if it did
]


class RunExistsError(FedoapError, FileExistsError):
    pass


class RunInUseError(FedoapError, RuntimeError):
    """Another process holds the run folder's lock: it is training, resuming or evaluating it."""


@dataclass
class _Hold:
    fd: int  # the open lock file that holds the lock
    file: Path  # where that file is (it moves with a folder moved aside)


class _Holds(threading.local):
    """The run folders this thread holds locked: resolved path -> its hold. Per thread, so that
    two threads of one process contend for a folder as two processes do."""

    def __init__(self) -> None:
        self.folders: dict[str, _Hold] = {}


_HOLDS = _Holds()


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def test_cases(self) -> Path:
        return self.root / "test_cases.csv"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.safetensors"

    def best(self, client: str) -> Path:
        return self.checkpoints / "best" / f"{client}.safetensors"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def is_started(self) -> bool:
        """Whether the folder holds anything besides its lock file (an empty folder made
        beforehand is not started, nor is one where a killed process left only its lock)."""
        if not self.root.is_dir():
            return self.root.exists()
        return any(p.name != LOCK_NAME for p in self.root.iterdir())

    @contextlib.contextmanager
    def lock(self, create: bool = False) -> Iterator[None]:
        """Hold the folder's lock file (``.fedoap.lock``, ``flock``) for the ``with`` block; the
        folder is created first with ``create``, else it must exist.

        Raises :class:`RunInUseError`, naming the holder's process id, if another process (or
        another thread) holds it; nothing in the folder is touched then. Nested holds in one
        thread share the first one. Released, and the file removed, when the block ends; a
        killed holder's lock is released by the kernel.
        """
        holds = _HOLDS.folders
        key = os.path.realpath(self.root)
        if key in holds:
            yield
            return
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise NotFoundError(f"{self.root} not found: no run folder there")
        hold = _Hold(self._acquire(), self.root / LOCK_NAME)
        holds[key] = hold
        try:
            yield
        finally:
            del holds[key]
            release_lock(hold.fd, hold.file)

    def _acquire(self) -> int:
        try:
            return acquire_lock(self.root / LOCK_NAME)
        except LockedError as err:
            by = f" (pid {err.pid})" if err.pid is not None else ""
            raise RunInUseError(
                f"run folder {self.root} is in use by another fedoap process{by}; wait for it "
                "to finish or stop it, or use another folder"
            ) from None

    def prepare(self, force: bool = False) -> Path | None:
        """Create the folder and its layout. An existing non-empty one is refused, or with
        ``force`` moved aside (never deleted); returns where it went.

        All under the folder's lock (:meth:`lock`): of two processes preparing the same new
        folder, one gets it and the other a :class:`RunInUseError` or, once the first has
        written, a :class:`RunExistsError`; a folder another process holds is never moved.
        """
        self.root.parent.mkdir(parents=True, exist_ok=True)
        with self.lock(create=True):
            moved = None
            if self.is_started():
                if not force:
                    raise RunExistsError(
                        f"run folder {self.root} already exists and is not empty; use --resume "
                        "to continue it or --force to move it aside and start over"
                    )
                stamp = time.strftime("%Y%m%d-%H%M%S")
                moved = self.root.with_name(f"{self.root.name}.old-{stamp}")
                self._move_aside(moved)
            for p in (self.checkpoints / "best", self.plots):
                p.mkdir(parents=True, exist_ok=True)
            return moved

    def _move_aside(self, to: Path) -> None:
        """Rename the folder, which this thread holds locked, to ``to`` and start a new one in
        its place; the hold moves to the new folder's lock file."""
        hold = _HOLDS.folders[os.path.realpath(self.root)]
        shutil.move(str(self.root), to)
        try:
            self.root.mkdir(exist_ok=True)
            fd = self._acquire()  # another process may have claimed the path meanwhile
        except BaseException:
            hold.file = to / LOCK_NAME  # still held: released where it went, as the block ends
            raise
        release_lock(hold.fd, to / LOCK_NAME)
        hold.fd = fd
        if self.is_started():
            raise RunExistsError(f"run folder {self.root} was recreated by another process")

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: csv_value(row.get(k)) for k in METRIC_FIELDS})
        atomic_write_text(self.metrics, buf.getvalue())

    def write_cases(self, rows: list[dict[str, Any]]) -> None:
        """``test_cases.csv``: one row per (client, test case), columns
        :data:`~fedoap.metrics.CASE_FIELDS`."""
        from fedoap.metrics import CASE_FIELDS

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(CASE_FIELDS), extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: csv_value(row.get(k)) for k in CASE_FIELDS})
        atomic_write_text(self.test_cases, buf.getvalue())

    def is_complete(self) -> bool:
        """Whether the run finished: ``summary.json`` is its last output, written after every
        other one (a run killed before it is completed by ``--resume``)."""
        return self.summary.is_file()

    def excluded(self) -> dict[str, Any]:
        """Clients dropped from a finished run because their training diverged
        (``train.on_divergence=exclude``): name -> where and why. They have no model."""
        if not self.summary.is_file():
            return {}
        return dict(json.loads(self.summary.read_text()).get("excluded", {}))

    def remove_stale_temporaries(self) -> None:
        """Delete the ``*.tmp`` files an atomic write killed mid-way left behind (the file it
        was replacing is intact and has been rewritten since).

        Only under the folder's lock, taken here if this thread does not hold it: while another
        process holds it, a temporary file may be that process's write in progress, and
        nothing is deleted (a Flower ServerApp's run is held by the ``fedoap run`` that
        launched it, which cleans up after it)."""
        if not self.root.is_dir():
            return
        try:
            with self.lock():
                for folder in (self.root, self.checkpoints, self.checkpoints / "best", self.plots):
                    for f in folder.glob(f"*{TMP_SUFFIX}"):
                        f.unlink(missing_ok=True)
        except RunInUseError:
            return

    def write_json(self, path: Path, data: Any) -> None:
        atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def csv_value(v: Any) -> Any:
    """A value as fedoap's CSV files write it: floats to 6 significant digits, None and NaN
    empty."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
