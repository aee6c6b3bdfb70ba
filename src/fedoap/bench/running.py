"""Running a benchmark: each cell as ``fedoap run`` subprocesses, ``--jobs`` at a time.

A cell is skipped when its outputs are written (:func:`is_done`) and resumed from its last
checkpoint when it was interrupted. Cells run with ``cores / jobs`` torch threads each, where
``cores`` is :func:`fedoap.cpu.cpu_budget`. After every cell, ``results.csv`` and ``cases.csv``
are rewritten from all finished cells (:func:`fedoap.bench.results.write_results`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from fedoap.bench.examples import save_examples
from fedoap.bench.planning import Cell
from fedoap.bench.results import DIVERGED, write_results
from fedoap.bench.spec import BenchSpec
from fedoap.bench.tracking import BenchTracking
from fedoap.config import Config, TrackingConfig
from fedoap.cpu import cpu_budget
from fedoap.errors import FedoapError
from fedoap.fileio import atomic_write_text, check_output_dir, open_append

logger = logging.getLogger(__name__)


class BenchError(FedoapError, RuntimeError):
    """Some cells of a benchmark failed (each cell's log says why); the others are kept."""


def _fedoap(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedoap.cli.main", *args]


def run_cell(
    cell: Cell,
    out: Path,
    spec: BenchSpec,
    bases: dict[str, Config],
    threads: int,
    tracking: BenchTracking | None = None,
) -> Path:
    """Run (or resume) one cell; returns its folder. Idempotent."""
    folder = out / "cells" / cell.key
    run_dir = folder / "run"
    write_cell_meta(cell, out)
    cfg = dataclasses.replace(
        cell.cfg, train=dataclasses.replace(cell.cfg.train, num_threads=threads)
    )
    cfg_path = folder / "config.yaml"
    if not cfg_path.exists():
        atomic_write_text(cfg_path, cfg.to_yaml())
    with open_append(folder / "log.txt", text=True) as log:
        _run_cell_steps(cell, folder, run_dir, cfg_path, spec, bases[cell.regime], log, tracking)
    return folder


def _run_cell_steps(
    cell: Cell,
    folder: Path,
    run_dir: Path,
    cfg_path: Path,
    spec: BenchSpec,
    base: Config,
    log: Any,
    tracking: BenchTracking | None = None,
) -> None:
    """The cell's run (resumed if it was interrupted), then its adaptation (LOO) or examples."""
    if not (run_dir / "summary.json").is_file():
        env = {**os.environ, **tracking.cell_env(cell.key)} if tracking else None
        if (run_dir / "config.yaml").is_file():  # its own config says where it reports
            cmd = _fedoap("run", "--resume", str(run_dir), "--quiet")
        else:
            cmd = _fedoap("run", "-c", str(cfg_path), "-o", str(run_dir), "--quiet", "--force")
            cmd += tracking.cell_args() if tracking else []
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    if cell.kind == "loo":
        assert cell.heldout is not None and spec.loo is not None
        adapt_dir = folder / "adapt"
        if not (adapt_dir / "summary.json").is_file():
            held = next(c for c in base.data.clients if c.name == cell.heldout)
            from fedoap.data.dataset import resolve_path

            assert held.path is not None
            cmd = _fedoap(
                "adapt",
                str(run_dir),
                "--data",
                str(resolve_path(base.data.root, held.path)),
                "--name",
                held.name,
                "--epochs",
                str(spec.loo.epochs),
                "--parts",
                spec.loo.parts,
                "--init",
                spec.loo.init,
                "-o",
                str(adapt_dir),
                "--force",
            )
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    elif needs_examples(cell, spec) and not (folder / "examples.npz").is_file():
        save_examples(run_dir, folder / "examples.npz", spec.examples_per_client)


def needs_examples(cell: Cell, spec: BenchSpec) -> bool:
    """Whether the cell keeps test images for the report's grid (the spec's first seed)."""
    return cell.kind in ("main", "ablation") and cell.seed == min(spec.seeds)


def record_divergence(cell: Cell, folder: Path) -> bool:
    """For an attack cell whose run failed: keep its divergence as the cell's outcome (True),
    or leave it a failure (False) when the log's last error is anything else."""
    if cell.kind != "attack":
        return False
    log = (folder / "log.txt").read_text(errors="replace").splitlines()
    errors = [line for line in log if line.startswith("error:")]
    if not errors or "not finite" not in errors[-1]:
        return False
    atomic_write_text(folder / DIVERGED, errors[-1].removeprefix("error:").strip() + "\n")
    return True


def is_done(cell: Cell, out: Path, spec: BenchSpec | None = None) -> bool:
    """Whether every output of the cell is written: its run's summary.json, and its adaptation
    (leave-one-out) or, with ``spec``, its examples. A cell killed between them is not done, so
    the next bench call finishes it (the run itself is not repeated)."""
    folder = out / "cells" / cell.key
    if cell.kind == "loo":
        return (folder / "adapt" / "summary.json").is_file()
    if (folder / DIVERGED).is_file():
        return True
    examples_missing = not (folder / "examples.npz").is_file()
    if spec is not None and needs_examples(cell, spec) and examples_missing:
        return False
    return (folder / "run" / "summary.json").is_file()


def run_bench(
    spec: BenchSpec,
    bases: dict[str, Config],
    out: Path,
    cells: list[Cell],
    jobs: int = 1,
    max_cells: int | None = None,
    tracking: TrackingConfig | None = None,
) -> None:
    """Run the cells not done yet, ``jobs`` at a time; with ``tracking``, every cell of
    ``cells`` reports to one store (:mod:`fedoap.bench.tracking`)."""
    check_output_dir(out)  # a file or an unwritable folder fails here, before any cell runs
    todo = [c for c in cells if not is_done(c, out, spec)]
    logger.info(f"{len(cells)} cells, {len(cells) - len(todo)} cached, {len(todo)} to run")
    if max_cells is not None:
        todo = todo[:max_cells]
    out.mkdir(parents=True, exist_ok=True)
    tracker = BenchTracking(out, tracking) if tracking is not None else None
    threads = max(1, cpu_budget() // max(jobs, 1))
    t0 = time.perf_counter()
    failures = []
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        futures = {pool.submit(run_cell, c, out, spec, bases, threads, tracker): c for c in todo}
        for i, fut in enumerate(as_completed(futures), 1):
            cell = futures[fut]
            try:
                fut.result()
                status = "done"
            except subprocess.CalledProcessError:
                if record_divergence(cell, out / "cells" / cell.key):
                    status = "diverged (an outcome of this attack; see its diverged.txt)"
                else:
                    failures.append(cell.key)
                    status = f"FAILED (see {out / 'cells' / cell.key / 'log.txt'})"
            write_results(out)
            minutes = (time.perf_counter() - t0) / 60
            logger.info(f"[{i}/{len(todo)}] {cell.key}: {status} ({minutes:.1f} min)")
    write_results(out)
    if tracker is not None:
        tracker.send_finished({c.key: out / "cells" / c.key / "run" for c in cells})
        tracker.finish(complete=not failures and all(is_done(c, out, spec) for c in cells))
    if failures:
        raise BenchError(
            f"{len(failures)} cell(s) failed (their logs are in {out / 'cells'}): "
            + ", ".join(failures)
        )


def write_cell_meta(cell: Cell, out: Path) -> None:
    """The cell's identity beside its config (``cell.json``), which
    :func:`fedoap.bench.results.finished_cells` reads back; written once."""
    folder = out / "cells" / cell.key
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "kind": cell.kind,
        "variant": cell.variant,
        "method": cell.method,
        "seed": cell.seed,
        "heldout": cell.heldout,
        "regime": cell.regime,
    }
    if not (folder / "cell.json").is_file():
        atomic_write_text(folder / "cell.json", json.dumps(meta, indent=2))
