"""The config's ``tracking`` section: where a run's config, per-client metrics, test table and
files are tracked (TensorBoard event files or an MLflow tracking store). An execution setting:
it decides where a run reports, never what it computes, so it is no part of a run's identity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedoap.config.keys import key


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking (fedoap.tracking), off by default."""

    backend: Literal["none", "tensorboard", "mlflow"] = key(
        "none",
        since=2,
        doc="`none`: no tracking (the run folder has everything). `tensorboard`: event files "
        "a TensorBoard reads (`tensorboard --logdir ...`). `mlflow`: an MLflow tracking store. "
        "Either gets the config, every client's training loss, validation Dice and validation "
        "case Dice per round and fine-tuning epoch, the test table, and tags for the method, "
        "seed, config digest and device; MLflow also the run folder's summary, metrics, test "
        "cases and plots as artifacts. Needs the `[tracking]` extra.",
    )
    uri: str | None = key(
        None,
        since=2,
        doc="`mlflow`: the tracking URI: a database (`sqlite:///path/mlflow.db`) or a tracking "
        "server (`http://host:5000`); null: `sqlite:///RUN_DIR/mlflow.db`, artifacts beside "
        "it (`fedoap bench`: one store in its output folder for every cell). `tensorboard`: "
        "the folder that holds one event folder per run, named after the run folder; null: "
        "`RUN_DIR/tensorboard`.",
    )
    experiment: str | None = key(
        None,
        since=2,
        doc="`mlflow`: the experiment the run belongs to; null: `fedoap` (`fedoap bench`: "
        "the name of its output folder).",
    )
