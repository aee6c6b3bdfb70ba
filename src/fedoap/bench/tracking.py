"""A benchmark in a tracker: one store for every cell (``OUT/mlflow.db`` or ``OUT/tensorboard``
unless a URI is given), one MLflow run per cell nested under one run of the benchmark, so a
study is browsed as a table, and cells finished before tracking was on sent from their folders.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from fedoap.config import Config, TrackingConfig, load_config
from fedoap.fileio import atomic_write_text
from fedoap.tracking import NAME_ENV, PARENT_ENV, check_tracking, replay

logger = logging.getLogger(__name__)

#: In the benchmark's folder: its MLflow run (the parent of its cells').
STATE_FILE = "tracking.json"


class BenchTracking:
    """Where a benchmark's cells report; :meth:`cell_args` and :meth:`cell_env` go to each
    cell's ``fedoap run``."""

    def __init__(self, out: Path, tracking: TrackingConfig) -> None:
        check_tracking(tracking)
        self.out = out
        if tracking.backend == "mlflow":
            uri = tracking.uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
        else:
            uri = tracking.uri or str((out / "tensorboard").resolve())
        experiment = tracking.experiment or out.resolve().name
        self.tracking = dataclasses.replace(
            tracking, uri=uri, experiment=experiment if tracking.backend == "mlflow" else None
        )
        self.parent = self._parent() if tracking.backend == "mlflow" else None

    def _parent(self) -> str:
        """The benchmark's own MLflow run, reopened when the benchmark is run again."""
        from fedoap.tracking.mlflow_store import MLflowStore

        t = self.tracking
        assert t.uri is not None and t.experiment is not None
        store = MLflowStore(t.uri, t.experiment)
        path = self.out / STATE_FILE
        state: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        same = state.get("uri") == t.uri and state.get("experiment") == t.experiment
        run_id = store.start(state["run_id"] if same else None, self.out.resolve().name, None)
        if not same:
            store.set_tags({"benchmark": str(self.out.resolve())})
        state = {"uri": t.uri, "experiment": t.experiment, "run_id": run_id}
        atomic_write_text(path, json.dumps(state, indent=1) + "\n")
        self.store = store
        return run_id

    def cell_args(self) -> list[str]:
        """Overrides of a cell's ``fedoap run`` (execution settings: the cell's identity is
        unchanged)."""
        t = self.tracking
        args = [f"tracking.backend={t.backend}", f"tracking.uri={t.uri}"]
        return args + ([f"tracking.experiment={t.experiment}"] if t.experiment else [])

    def cell_env(self, key: str) -> dict[str, str]:
        env = {NAME_ENV: key}
        if self.parent:
            env[PARENT_ENV] = self.parent
        return env

    def send_finished(self, run_dirs: dict[str, Path]) -> int:
        """Send finished cells that are not in the store yet (run before tracking was on, or
        tracked elsewhere), from their folders; returns how many were sent."""
        sent = 0
        for key, run_dir in run_dirs.items():
            if not (run_dir / "summary.json").is_file():
                continue
            cfg = load_config(run_dir / "config.yaml")
            cfg = dataclasses.replace(cfg, tracking=self.tracking)
            sent += replay(cfg, run_dir, name=key, parent=self.parent)
        if sent:
            logger.info(f"sent {sent} finished cell(s) to {self.tracking.uri}")
        return sent

    def finish(self, complete: bool) -> None:
        """The benchmark's run ends as finished once every cell is; otherwise it stays open."""
        if self.parent and complete:
            self.store.end("FINISHED")


def tracked_config(cfg: Config, tracking: TrackingConfig | None) -> TrackingConfig | None:
    """The tracking a benchmark uses: the command line's, else its base config's."""
    if tracking is not None and tracking.backend != "none":
        return tracking
    return cfg.tracking if cfg.tracking.backend != "none" else None
