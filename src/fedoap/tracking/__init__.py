"""Experiment tracking (``tracking`` in the config): a run's config, every client's metrics per
round and fine-tuning epoch, its test table and files, in TensorBoard event files or an MLflow
tracking store. A run's folder keeps everything either way; tracking is where teams browse it.
"""

from fedoap.tracking.core import (
    NAME_ENV,
    PARENT_ENV,
    STATE_FILE,
    Tracker,
    check_tracking,
    destination,
    metric_key,
    open_tracker,
    replay,
    scalars,
)

__all__ = [
    "NAME_ENV",
    "PARENT_ENV",
    "STATE_FILE",
    "Tracker",
    "check_tracking",
    "destination",
    "metric_key",
    "open_tracker",
    "replay",
    "scalars",
]
