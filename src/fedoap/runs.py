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
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedoap.errors import FedoapError
from fedoap.fileio import TMP_SUFFIX, atomic_write_text

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
        return self.root.exists() and any(self.root.iterdir())

    def prepare(self, force: bool = False) -> Path | None:
        """Create the folder. An existing non-empty one is refused, or with ``force`` moved aside
        (never deleted); returns where it went."""
        moved = None
        if self.is_started():
            if not force:
                raise RunExistsError(
                    f"run folder {self.root} already exists and is not empty; use --resume to "
                    "continue it or --force to move it aside and start over"
                )
            moved = self.root.with_name(f"{self.root.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(str(self.root), moved)
        for p in (self.root, self.checkpoints / "best", self.plots):
            p.mkdir(parents=True, exist_ok=True)
        return moved

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: _fmt(row.get(k)) for k in METRIC_FIELDS})
        atomic_write_text(self.metrics, buf.getvalue())

    def write_cases(self, rows: list[dict[str, Any]]) -> None:
        """``test_cases.csv``: one row per (client, test case), columns
        :data:`~fedoap.metrics.CASE_FIELDS`."""
        from fedoap.metrics import CASE_FIELDS

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(CASE_FIELDS), extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: _fmt(row.get(k)) for k in CASE_FIELDS})
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
        was replacing is intact and has been rewritten since)."""
        for folder in (self.root, self.checkpoints, self.checkpoints / "best", self.plots):
            for f in folder.glob(f"*{TMP_SUFFIX}"):
                f.unlink(missing_ok=True)

    def write_json(self, path: Path, data: Any) -> None:
        atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def _fmt(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
