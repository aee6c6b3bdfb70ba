"""What a tracked run reports, whichever backend takes it: the config as parameters, tags, every
client's metrics per round and fine-tuning epoch as ``metrics.csv`` holds them, the test table,
and the run folder's files.

A run's tracking state lives in its folder (``tracking.json``: for each store it has reported
to, its run there and how many metric rows it has sent), so a resumed run reports to the same
run and sends only the rows it has not sent yet; a benchmark sends a finished cell's folder the same
way (:func:`replay`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from fedoap.config import Config, ConfigError, TrackingConfig
from fedoap.fileio import atomic_write_text

logger = logging.getLogger(__name__)

#: In the run folder: where the run reports, and how far it got.
STATE_FILE = "tracking.json"
#: The environment variables a benchmark sets for its cells: the MLflow run they nest under,
#: and the name each reports under (the cell's).
PARENT_ENV, NAME_ENV = "FEDOAP_TRACKING_PARENT", "FEDOAP_TRACKING_NAME"
#: The columns of ``metrics.csv`` that are tracked, per client.
TRACKED = ("train_loss", "val_dice", "val_case_dice")
#: The test scores of ``summary.json`` that are tracked, per client and for the mean.
TEST_METRICS = ("dice", "iou", "hd95_px", "case_dice")
#: The run folder's files an MLflow run keeps as artifacts (those that exist).
ARTIFACTS = ("config.yaml", "summary.json", "metrics.csv", "test_cases.csv", "splits.json")
#: What each backend needs installed (the ``[tracking]`` extra).
MODULES = {"mlflow": "mlflow", "tensorboard": "tensorboard"}


class Backend(Protocol):
    """Where a run reports: an MLflow store or TensorBoard event files."""

    def start(self, run_id: str | None, name: str, parent: str | None) -> str: ...
    def log_params(self, params: Mapping[str, str]) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def log_scalars(self, scalars: Sequence[tuple[str, int, float]]) -> None: ...
    def log_text(self, name: str, text: str) -> None: ...
    def log_files(self, files: Sequence[Path]) -> None: ...
    def end(self, status: str) -> None: ...


def check_tracking(cfg: TrackingConfig) -> None:
    """Refuse, before any work, a backend that is not installed."""
    module = MODULES.get(cfg.backend)
    if module is not None and importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"tracking.backend={cfg.backend}: {module} is not installed; "
            "pip install 'fedoap[tracking]'"
        )


def metric_key(name: str) -> str:
    """A client's name as a metric key segment: MLflow allows letters, digits, ``_ - . /`` and
    spaces, and a client name may also hold ``+``."""
    return name.replace("+", "_")


def scalars(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, int, float]]:
    """``(key, step, value)`` for the tracked columns of ``metrics.csv`` rows, the values as
    the file writes them. The federated rounds and the fine-tuning epochs are one curve per
    client and column (``val_dice/brain_mri``, step = the row's round); the safeguard's
    local-only model has curves of its own (``safeguard_val_dice/brain_mri``)."""
    from fedoap.runs import csv_value

    out = []
    for row in rows:
        stage = str(row["stage"])
        prefix = "" if stage in ("federated", "finetune") else f"{stage}_"
        for col in TRACKED:
            text = csv_value(row.get(col))
            if text != "":
                key = f"{prefix}{col}/{metric_key(str(row['client']))}"
                out.append((key, int(row["round"]), float(text)))
    return out


def _test_tables(summary: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Each client's test scores in ``summary.json``, and the mean's."""
    tables = {str(n): c.get("test") or {} for n, c in summary.get("clients", {}).items()}
    tables["mean"] = summary.get("mean", {}).get("test") or {}
    return tables


def test_scalars(summary: Mapping[str, Any], step: int) -> list[tuple[str, int, float]]:
    """The test table of ``summary.json``: ``test_dice/<client>`` ..., and ``test_dice/mean``."""
    out = []
    for who, test in _test_tables(summary).items():
        for m in TEST_METRICS:
            v = test.get(m)
            if isinstance(v, int | float):
                out.append((f"test_{m}/{metric_key(who)}", step, float(v)))
    return out


def test_markdown(summary: Mapping[str, Any]) -> str:
    head = "| client | " + " | ".join(TEST_METRICS) + " |"
    lines = [head, "|" + "---|" * (len(TEST_METRICS) + 1)]
    for n, t in _test_tables(summary).items():
        cells = [f"{t[m]:.4f}" if isinstance(t.get(m), int | float) else "-" for m in TEST_METRICS]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def flat_params(cfg: Config) -> dict[str, str]:
    """The resolved config as dotted parameters (``federation.rounds``: ``10``)."""

    def walk(prefix: str, value: Any, out: dict[str, str]) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v, out)
        else:
            out[prefix] = json.dumps(value) if not isinstance(value, str) else value

    out: dict[str, str] = {}
    walk("", cfg.to_dict(), out)
    return out


class Tracker:
    """A run's reporting: a no-op unless ``tracking.backend`` names a backend."""

    def log_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """``metrics.csv``'s rows so far; the ones not sent yet are sent."""

    def finish(self, summary: Mapping[str, Any]) -> None:
        """The test table, the device and the run folder's files; the run ends as finished."""


class Tracked(Tracker):
    """A tracker with a backend. A backend that fails (a tracking server gone) stops the
    tracking with one warning, never the run: the run folder has everything."""

    def __init__(
        self,
        backend: Backend,
        folder: Path,
        cfg: Config,
        where: dict[str, Any],
        parent: str | None = None,
    ) -> None:
        self.backend, self.folder, self.where = backend, folder, where
        self.failed = False
        self.last_step = 0  # the last round of the rows seen (log_rows)
        state = _read_state(folder, where)
        self.sent = int(state["rows"]) if state else 0
        run_id = str(state["run_id"]) if state else None
        parent = parent or os.environ.get(PARENT_ENV) or None
        self.run_id = backend.start(run_id, str(where["name"]), parent)
        if run_id is None:
            backend.log_params(flat_params(cfg))
            backend.set_tags(
                {
                    "method": cfg.method,
                    "seed": str(cfg.seed),
                    "config_digest": cfg.digest(),
                    "run_folder": str(folder.resolve()),
                }
            )
            backend.log_text("config", "```yaml\n" + cfg.to_yaml() + "```")
        self._save(finished=False)

    def _save(self, finished: bool) -> None:
        entry = {**self.where, "run_id": self.run_id, "rows": self.sent, "finished": finished}
        runs = [r for r in _read_states(self.folder) if not _same(r, self.where)] + [entry]
        atomic_write_text(self.folder / STATE_FILE, json.dumps({"runs": runs}, indent=1) + "\n")

    def log_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        # The test table goes at the last step metrics.csv has.
        self.last_step = max((int(r["round"]) for r in rows), default=0)
        if len(rows) <= self.sent or self.failed:
            return
        try:
            self.backend.log_scalars(scalars(rows[self.sent :]))
        except Exception as err:  # noqa: BLE001 (any backend error: the run goes on)
            self._fail(err)
            return
        self.sent = len(rows)
        self._save(finished=False)

    def _fail(self, err: Exception) -> None:
        self.failed = True
        logger.warning(
            f"tracking to {self.where['uri']} stopped: {type(err).__name__}: {err}; the run "
            "goes on, and its folder holds every metric"
        )

    def finish(self, summary: Mapping[str, Any]) -> None:
        if self.failed:
            return
        try:
            self._finish(summary)
        except Exception as err:  # noqa: BLE001
            self._fail(err)

    def _finish(self, summary: Mapping[str, Any]) -> None:
        execution = summary.get("execution") or {}
        self.backend.set_tags(
            {
                "device": str(execution.get("name") or execution.get("device", "")),
                "precision": str(execution.get("precision", "")),
                "fedoap": str(execution.get("fedoap", "")),
            }
        )
        self.backend.log_scalars(test_scalars(summary, self.last_step))
        self.backend.log_text("test", test_markdown(summary))
        files = [self.folder / f for f in ARTIFACTS]
        plots = sorted((self.folder / "plots").glob("*.png"))
        self.backend.log_files([f for f in files + plots if f.is_file()])
        self.backend.end("FINISHED")
        self._save(finished=True)


def _read_states(folder: Path) -> list[dict[str, Any]]:
    """Every store the run in ``folder`` has reported to: its run there and how far it got."""
    path = folder / STATE_FILE
    if not path.is_file():
        return []
    try:
        return [dict(r) for r in json.loads(path.read_text())["runs"]]
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning(f"{path} is unreadable: the run reports to a new tracking run")
        return []


def _same(state: Mapping[str, Any], where: Mapping[str, Any]) -> bool:
    return all(state.get(k) == v for k, v in where.items())


def _read_state(folder: Path, where: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run's state in the store ``where`` names, if it has reported there."""
    return next((s for s in _read_states(folder) if _same(s, where)), None)


def destination(cfg: Config, folder: Path, name: str | None = None) -> dict[str, Any]:
    """Where the run in ``folder`` reports: the backend, its resolved address and the run's
    name there (``name``, else the benchmark cell's (:data:`NAME_ENV`), else the folder's)."""
    tr = cfg.tracking
    name = name or os.environ.get(NAME_ENV) or folder.resolve().name
    if tr.backend == "mlflow":
        uri = tr.uri or f"sqlite:///{(folder / 'mlflow.db').resolve()}"
        experiment = tr.experiment or "fedoap"
        return {"backend": "mlflow", "uri": uri, "experiment": experiment, "name": name}
    logdir = Path(tr.uri) / name if tr.uri else folder / "tensorboard"
    return {"backend": "tensorboard", "uri": str(logdir.resolve()), "name": name}


def open_tracker(
    cfg: Config, folder: Path, name: str | None = None, parent: str | None = None
) -> Tracker:
    """The tracker of the run in ``folder`` (see :func:`destination`); a resumed run reports
    to the run it started. ``parent``: the MLflow run it nests under (else :data:`PARENT_ENV`)."""
    if cfg.tracking.backend == "none":
        return Tracker()
    check_tracking(cfg.tracking)
    where = destination(cfg, folder, name)
    backend: Backend
    try:
        if where["backend"] == "mlflow":
            from fedoap.tracking.mlflow_store import MLflowStore

            backend = MLflowStore(where["uri"], where["experiment"])
        else:
            from fedoap.tracking.tensorboard_files import EventFiles

            backend = EventFiles(Path(where["uri"]))
        return Tracked(backend, folder, cfg, where, parent)
    except Exception as err:  # a store out of reach: the run goes on untracked
        logger.warning(
            f"tracking to {where['uri']} is off: {type(err).__name__}: {err}; the run goes on, "
            "and its folder holds every metric"
        )
        return Tracker()


def replay(cfg: Config, folder: Path, name: str | None = None, parent: str | None = None) -> bool:
    """Send a finished run folder (a benchmark cell run before tracking was on, or tracked to
    another store) to ``cfg.tracking``; False when it is there already, or unfinished."""
    from fedoap.runs import read_metrics

    summary_path = folder / "summary.json"
    if cfg.tracking.backend == "none" or not summary_path.is_file():
        return False
    where = destination(cfg, folder, name)
    state = _read_state(folder, where) or {}
    if state.get("finished"):
        return False
    tracker = open_tracker(cfg, folder, name, parent)
    tracker.log_rows(read_metrics(folder / "metrics.csv"))
    tracker.finish(json.loads(summary_path.read_text()))
    return True
