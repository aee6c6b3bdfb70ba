"""An MLflow tracking store as a tracking backend: a local database (``sqlite:///...``) or a
tracking server, through MLflow's client API (no global active run, so a library call, a Flower
process or a benchmark's cells each report to the run they name)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

#: MLflow's limits per batch call (metrics, params and tags).
METRICS_PER_BATCH, PARAMS_PER_BATCH = 1000, 100
#: MLflow's limit on a parameter's value.
PARAM_CHARS = 6000
#: MLflow's tag that nests a run under another (a benchmark's cells under the benchmark).
PARENT_TAG = "mlflow.parentRunId"


def _quiet_mlflow() -> None:
    """MLflow announces its database migrations at INFO; fedoap's own log says what matters."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


class MLflowStore:
    def __init__(self, uri: str, experiment: str) -> None:
        from mlflow.tracking import MlflowClient

        _quiet_mlflow()  # after the import, which sets MLflow's own levels

        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            # A local database keeps its artifacts beside it; a server decides for itself.
            db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
            location = (db.parent / "mlartifacts").resolve().as_uri() if db else None
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=location
            )
        else:
            self.experiment_id = found.experiment_id
        self.run_id = ""

    def start(self, run_id: str | None, name: str, parent: str | None) -> str:
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        else:
            tags = {PARENT_TAG: parent} if parent else {}
            run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
            self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + PARAMS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_scalars(self, scalars: Sequence[tuple[str, int, float]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, step, v in scalars]
        for i in range(0, len(items), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + METRICS_PER_BATCH])

    def log_text(self, name: str, text: str) -> None:
        self.client.log_text(self.run_id, text, f"{name}.md")

    def log_files(self, files: Sequence[Path]) -> None:
        for f in files:
            folder = "plots" if f.parent.name == "plots" else None
            self.client.log_artifact(self.run_id, str(f), folder)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)
