"""The benchmark: methods x seeds, FedOAP ablations and leave-one-client-out, cached per cell.

A benchmark spec (``benchmarks/federation4.yaml``) names a base run config and the matrix. Every
*cell* is one run: (kind, variant, seed) with its resolved config. A cell lives in
``OUT/cells/<variant>-seed<k>-<digest>/`` and is skipped when its ``summary.json`` exists, so an
interrupted or extended benchmark only runs what is missing; a killed cell resumes from its last
checkpoint. ``--max-cells`` splits the work into chunks across invocations. After every cell,
``OUT/results.csv`` is rewritten from all finished cells.

Cells run as ``fedoap run`` subprocesses, ``--jobs`` at a time, each with ``cores / jobs`` torch
threads, where ``cores`` is :func:`fedoap.cpu.cpu_budget` (``OMP_NUM_THREADS`` when set, else the
cores the process may run on). Two single-thread runs give about 25% more throughput than one
two-thread run on a 2-core machine. The thread count is not part of a cell's identity.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import io
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedoap.config import (
    AttackConfig,
    Config,
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    load_yaml,
    validate,
)
from fedoap.cpu import cpu_budget
from fedoap.errors import FedoapError
from fedoap.fileio import (
    SAFE_NAME,
    atomic_write_text,
    atomic_writer,
    check_output_dir,
    open_append,
    safe_name,
)
from fedoap.metrics import CASE_FIELDS
from fedoap.runs import read_metrics

RESULT_FIELDS = [
    "kind",
    "variant",
    "method",
    "seed",
    "client",
    "test_dice",
    "test_iou",
    "test_hd95_px",
    "test_case_dice",
    "best_round",
    "val_dice",
    "bytes_up_per_round",
    "bytes_down_per_round",
    "seconds_per_round",
    "seconds_total",
    "breaks_privacy",
    "config_digest",
    "val_curve",
    "device_name",
    "peak_memory_gib",
    "regime",
    "attacker",  # attack cells: 1 for a client that attacks in this cell
    "refused",  # attack cells: how many uploads the server refused over the run
    "diverged",  # attack cells: why the run stopped with a non-finite model (no scores)
    "epsilon",  # privacy.dp: the (epsilon, delta) the client spent (summary.json privacy)
    "delta",
    "dp_unit",  # privacy.dp.unit: what one unit of that (epsilon, delta) is, image or case
    "client_epsilon",  # privacy.client_dp: the run's client-level epsilon (DP-FedAvg)
    # attack cells: the config digest of the same defence without the attack. The report takes
    # the main cell as a defence's clean run only when this equals the main cell's digest.
    "clean_digest",
    "max_train_cases",  # data.max_train_cases: the cell's data-size setting (empty: all)
    "train_cases",  # the cases (patients) the client trained on
    "test_cases",  # its test cases
    "safeguard_choice",  # safeguard.mode: what the client kept (federated, local, interpolated)
    "safeguard_alpha",
    "val_federated",  # the validation scores the safeguard compared
    "val_local",
    "safeguard_seconds",  # what the cell's safeguard stage cost (all sites)
]

#: ``cases.csv``: one row per (cell, client, test case), from each cell's ``test_cases.csv``.
CASE_RESULT_FIELDS = [
    "regime",
    "kind",
    "variant",
    "method",
    "seed",
    "max_train_cases",
    "train_cases",
    "config_digest",
    *CASE_FIELDS,
]


@dataclass(frozen=True)
class AblationSpec:
    name: str
    overrides: tuple[str, ...] = ()
    # The regimes it runs in (empty: all of them); defences of an attack grid ignore it.
    regimes: tuple[str, ...] = ()


@dataclass(frozen=True)
class VariantSpec:
    """A method with settings of its own, run beside the methods as one of them (its ``name``
    is its column): e.g. ``fedoap+sg``, FedOAP with ``safeguard.mode=interpolate``."""

    name: str
    method: str
    overrides: tuple[str, ...] = ()
    # The regimes it runs in (empty: all of them).
    regimes: tuple[str, ...] = ()


@dataclass(frozen=True)
class LOOSpec:
    """Leave-one-client-out: federate K-1 clients, adapt to the held-out one."""

    methods: tuple[str, ...] = ("fedoap", "fedavg", "feddp")
    seeds: tuple[int, ...] = (0,)
    epochs: int = 2
    parts: str = "all"
    init: str = "averaged"


@dataclass(frozen=True)
class RegimeSpec:
    """One setting of the same matrix: a run config (relative to the spec file) and overrides."""

    name: str
    base: str
    overrides: tuple[str, ...] = ()
    # A subset of the spec's methods for this regime only (empty: all of them), e.g. a variant
    # measured for the headline methods alone.
    methods: tuple[str, ...] = ()


@dataclass(frozen=True)
class AttackGridSpec:
    """Attacks x defences (issue 15): each ``kinds`` attack by ``sites``, and the clean run,
    under each defence (a name and config overrides), for each method and seed. Every cell is a
    full run; the report compares the honest sites' test Dice with the clean run's."""

    sites: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ("nan", "scale", "sign_flip", "noise", "invert_masks")
    defences: tuple[AblationSpec, ...] = ()


@dataclass(frozen=True)
class BenchSpec:
    # The run config (relative to the spec file) that every cell derives from; or, instead,
    # ``regimes``: the whole matrix once per regime (e.g. one organ at four institutions, and
    # four organs), reported regime by regime.
    base: str = ""
    overrides: tuple[str, ...] = ()
    regimes: tuple[RegimeSpec, ...] = ()
    methods: tuple[str, ...] = ()  # empty: every registered method
    # Methods with settings of their own, planned and reported as methods (main cells).
    variants: tuple[VariantSpec, ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2)
    ablation_method: str = "fedoap"
    ablations: tuple[AblationSpec, ...] = ()
    loo: LOOSpec | None = None
    attacks: AttackGridSpec | None = None
    examples_per_client: int = 4  # test images per client kept for the report's grid


def load_spec(path: Path) -> tuple[BenchSpec, dict[str, Config]]:
    """The spec and its base config per regime (one regime named "" without ``regimes``)."""
    if not path.is_file():
        raise ConfigError(f"benchmark spec not found: {path}")
    raw = load_yaml(path.read_text(), str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    spec = from_dict(BenchSpec, raw, prefix="")
    if bool(spec.base) == bool(spec.regimes):
        raise ConfigError(f"{path}: give either base or regimes (a list of name/base)")
    _check_variants(path, spec)
    if not spec.regimes:
        bases = {"": load_config((path.parent / spec.base).resolve(), spec.overrides)}
        return spec, _check_loo_clients(path, spec, bases)
    names = [r.name for r in spec.regimes]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: regime names must be distinct, got {names}")
    for name in names:  # each names its cells' folders and its figures' folder
        safe_name(name, "regime", path)
    for r in spec.regimes:
        extra = [m for m in r.methods if spec.methods and m not in spec.methods]
        if extra:
            raise ConfigError(
                f"{path}: regime {r.name!r} lists methods {extra} that are not in the spec's "
                f"methods {list(spec.methods)}; a regime can only run a subset of them"
            )
    bases = {
        r.name: load_config((path.parent / r.base).resolve(), [*spec.overrides, *r.overrides])
        for r in spec.regimes
    }
    return spec, _check_loo_clients(path, spec, bases)


def _check_loo_clients(path: Path, spec: BenchSpec, bases: dict[str, Config]) -> dict[str, Config]:
    """``bases``, once every client that leave-one-out holds out can name a cell folder
    (``loo-<client>-<method>``)."""
    if spec.loo is not None:
        for base in bases.values():
            for c in base.data.clients:
                safe_name(c.name, "loo: held-out client", path)
    return bases


def _check_variants(path: Path, spec: BenchSpec) -> None:
    """Variant names are distinct words that name no method, and name regimes that exist;
    ablation names are words too (both name cell folders)."""
    from fedoap.algorithms import ALGORITHMS

    names = [v.name for v in spec.variants]
    regimes = {r.name for r in spec.regimes}
    for v in spec.variants:
        if not SAFE_NAME.fullmatch(v.name) or names.count(v.name) > 1:
            raise ConfigError(
                f"{path}: variants: names must be distinct words (letters, digits, _ . + -, "
                f"starting with a letter, a digit or _), got {v.name!r}"
            )
        if v.name in ALGORITHMS.names():
            raise ConfigError(f"{path}: variants: {v.name!r} is a method's name; rename it")
        ALGORITHMS.get(v.method)  # an unknown method fails here, listing the known ones
    for a in spec.ablations:  # "<ablation_method>-<name>" names the ablation's cell folders
        safe_name(a.name, "ablation name", path)
    for what, items in (("variants", spec.variants), ("ablations", spec.ablations)):
        for item in items:
            unknown = [r for r in item.regimes if r not in regimes]
            if unknown:
                raise ConfigError(
                    f"{path}: {what}: {item.name!r} names regimes {unknown} that the spec does "
                    f"not have ({', '.join(sorted(regimes)) or 'none'})"
                )


class BenchError(FedoapError, RuntimeError):
    """Some cells of a benchmark failed (each cell's log says why); the others are kept."""


@dataclass(frozen=True)
class Cell:
    kind: str  # main | ablation | loo
    variant: str  # method name, "fedoap-<ablation>", or "loo-<client>-<method>"
    method: str
    seed: int
    cfg: Config
    heldout: str | None = None  # loo only
    regime: str = ""  # the spec's regime ("" for a spec with one base)

    @property
    def key(self) -> str:
        prefix = f"{self.regime}-" if self.regime else ""
        return f"{prefix}{self.variant}-seed{self.seed}-{digest(self.cfg)}"


def digest(cfg: Config) -> str:
    """Cell identity: the resolved config without execution details (thread count)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_threads=0)).digest()


def derive(base: Config, overrides: Sequence[str]) -> Config:
    cfg = from_dict(Config, apply_overrides(base.to_dict(), list(overrides)))
    validate(cfg)
    if cfg.train.on_divergence != "stop":
        # A cell whose client was dropped would enter the tables with one client fewer, and
        # paired comparisons would silently lose it: a diverged cell fails and is reported.
        raise ConfigError(
            "train.on_divergence=exclude cannot be used in a benchmark (every cell must report "
            "every client); leave it at stop"
        )
    from fedoap.training.device import resolve_precision

    # a cell's identity is the precision it runs in here (train.precision=auto resolved)
    return resolve_precision(cfg)


def plan(
    spec: BenchSpec,
    bases: dict[str, Config],
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    kinds: Sequence[str] = ("main", "ablation", "loo", "attack"),
) -> list[Cell]:
    """Every cell of the matrix, regime by regime."""
    subsets = {r.name: r.methods for r in spec.regimes}
    cells = []
    for regime, base in bases.items():
        chosen = methods
        if subsets.get(regime):
            wanted = list(methods or spec.methods or subsets[regime])
            chosen = [m for m in wanted if m in subsets[regime]]
            if not chosen:
                continue  # none of the asked-for methods runs in this regime
        mine = dataclasses.replace(
            spec, ablations=tuple(a for a in spec.ablations if not a.regimes or regime in a.regimes)
        )
        cells += [
            dataclasses.replace(cell, regime=regime)
            for cell in _plan_one(mine, base, chosen, seeds, kinds)
        ]
        if "main" in kinds:
            cells += [
                dataclasses.replace(cell, regime=regime)
                for cell in _plan_variants(spec, base, regime, methods, seeds)
            ]
    return cells


def _plan_variants(
    spec: BenchSpec,
    base: Config,
    regime: str,
    methods: Sequence[str] | None,
    seeds: Sequence[int] | None,
) -> list[Cell]:
    """The variants' main cells in one regime. A ``methods`` selection (``--method``) keeps the
    variants of those methods; their names are matched by ``--variant``."""
    cells = []
    for seed in list(seeds if seeds is not None else spec.seeds):
        for v in spec.variants:
            if (v.regimes and regime not in v.regimes) or (methods and v.method not in methods):
                continue
            try:
                cfg = derive(base, [f"method={v.method}", f"seed={seed}", *v.overrides])
            except ConfigError as err:
                raise ConfigError(f"variants[{v.name}]: {err}") from err
            cells.append(Cell("main", v.name, v.method, seed, cfg))
    return cells


def select_variants(cells: list[Cell], patterns: Sequence[str]) -> list[Cell]:
    """The cells whose variant matches one of the glob ``patterns`` (``fedoap``: the main cell;
    ``fedoap.median.*``: its median column of the attack grid); all of them without patterns.
    A pattern that matches no planned cell is a :class:`ConfigError` naming it."""
    if not patterns:
        return cells
    for p in patterns:
        if not any(fnmatch.fnmatchcase(c.variant, p) for c in cells):
            known = ", ".join(dict.fromkeys(c.variant for c in cells))
            raise ConfigError(f"--variant {p!r} matches no planned cell; the variants: {known}")
    return [c for c in cells if any(fnmatch.fnmatchcase(c.variant, p) for p in patterns)]


def _plan_one(
    spec: BenchSpec,
    base: Config,
    methods: Sequence[str] | None,
    seeds: Sequence[int] | None,
    kinds: Sequence[str],
) -> list[Cell]:
    from fedoap.algorithms import ALGORITHMS

    methods = list(methods or spec.methods or ALGORITHMS.names())
    for m in methods:
        ALGORITHMS.get(m)  # unknown names fail here, listing the known ones
    seeds = list(seeds if seeds is not None else spec.seeds)
    cells: list[Cell] = []
    if "main" in kinds:
        for seed in seeds:
            for m in methods:
                cfg = derive(base, [f"method={m}", f"seed={seed}"])
                cells.append(Cell("main", m, m, seed, cfg))
    if "ablation" in kinds:
        for seed in seeds:
            for ab in spec.ablations:
                cfg = derive(
                    base, [f"method={spec.ablation_method}", f"seed={seed}", *ab.overrides]
                )
                cells.append(
                    Cell(
                        "ablation",
                        f"{spec.ablation_method}-{ab.name}",
                        spec.ablation_method,
                        seed,
                        cfg,
                    )
                )
    if "attack" in kinds and spec.attacks is not None:
        grid = spec.attacks
        if not grid.sites or not grid.defences:
            raise ConfigError("attacks: needs sites (the attackers) and defences")
        names = [d.name for d in grid.defences]
        if len(set(names)) != len(names) or not all(
            re.fullmatch(r"[A-Za-z0-9_-]+", n) for n in names
        ):
            raise ConfigError(f"attacks.defences: names must be distinct words, got {names}")
        sites = "[" + ", ".join(grid.sites) + "]"
        for seed in seeds:
            for m in methods:
                # A clean run under a defence with no overrides is the method's main cell.
                main = digest(derive(base, [f"method={m}", f"seed={seed}"]))
                for d in grid.defences:
                    for kind in ("clean", *grid.kinds):
                        attack = (
                            []
                            if kind == "clean"
                            else [
                                f"federation.attack.sites={sites}",
                                f"federation.attack.kind={kind}",
                            ]
                        )
                        # Errors name the defence: "attacks.defences[name]: federation...".
                        try:
                            cfg = derive(
                                base, [f"method={m}", f"seed={seed}", *d.overrides, *attack]
                            )
                        except ConfigError as err:
                            raise ConfigError(f"attacks.defences[{d.name}], {kind}: {err}") from err
                        if kind == "clean" and digest(cfg) == main:
                            continue
                        cells.append(Cell("attack", f"{m}.{d.name}.{kind}", m, seed, cfg))
    if "loo" in kinds and spec.loo is not None:
        selected = [c.name for c in base.data.clients if c.where]
        if selected:
            # fedoap adapt reads the held-out client's whole file, not its selected rows.
            raise ConfigError(
                f"loo: clients {selected} select rows of a file (where), which leave-one-out "
                "adaptation does not support yet; drop loo from this spec"
            )
        for seed in spec.loo.seeds:
            for held in [c.name for c in base.data.clients]:
                for m in spec.loo.methods:
                    cfg = derive(base, [f"method={m}", f"seed={seed}"])
                    kept = tuple(c for c in cfg.data.clients if c.name != held)
                    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, clients=kept))
                    cells.append(Cell("loo", f"loo-{held}-{m}", m, seed, cfg, heldout=held))
    return cells


# ------------------------------------------------------------------------------ running


def _fedoap(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedoap.cli.main", *args]


def run_cell(
    cell: Cell, out: Path, spec: BenchSpec, bases: dict[str, Config], threads: int
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
        _run_cell_steps(cell, folder, run_dir, cfg_path, spec, bases[cell.regime], log)
    return folder


def _run_cell_steps(
    cell: Cell, folder: Path, run_dir: Path, cfg_path: Path, spec: BenchSpec, base: Config, log: Any
) -> None:
    """The cell's run (resumed if it was interrupted), then its adaptation (LOO) or examples."""
    if not (run_dir / "summary.json").is_file():
        if (run_dir / "config.yaml").is_file():
            cmd = _fedoap("run", "--resume", str(run_dir), "--quiet")
        else:
            cmd = _fedoap("run", "-c", str(cfg_path), "-o", str(run_dir), "--quiet", "--force")
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
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


#: An attack cell whose run stopped because the model became non-finite (an attack let in
#: without defence): an outcome to report, not a failure. Holds the run's error line.
DIVERGED = "diverged.txt"


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
    log: Callable[[str], None] = print,
) -> None:
    check_output_dir(out)  # a file or an unwritable folder fails here, before any cell runs
    todo = [c for c in cells if not is_done(c, out, spec)]
    log(f"{len(cells)} cells, {len(cells) - len(todo)} cached, {len(todo)} to run")
    if max_cells is not None:
        todo = todo[:max_cells]
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, cpu_budget() // max(jobs, 1))
    t0 = time.perf_counter()
    failures = []
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        futures = {pool.submit(run_cell, c, out, spec, bases, threads): c for c in todo}
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
            log(f"[{i}/{len(todo)}] {cell.key}: {status} ({minutes:.1f} min)")
    write_results(out)
    if failures:
        raise BenchError(
            f"{len(failures)} cell(s) failed (their logs are in {out / 'cells'}): "
            + ", ".join(failures)
        )


# ------------------------------------------------------------------------------ results


def clean_digest(cfg: Config) -> str:
    """The digest of ``cfg`` without its attack: its defence's clean run."""
    fed = dataclasses.replace(cfg.federation, attack=AttackConfig())
    return digest(dataclasses.replace(cfg, federation=fed))


def cell_rows(cell: Cell, folder: Path) -> list[dict[str, Any]]:
    clean = clean_digest(cell.cfg) if cell.kind == "attack" else None
    if (folder / DIVERGED).is_file():  # an attack let in: no scores, the reason instead
        why = (folder / DIVERGED).read_text().strip()
        return [
            {
                "kind": cell.kind,
                "variant": cell.variant,
                "method": cell.method,
                "seed": cell.seed,
                "client": c.name,
                "config_digest": digest(cell.cfg),
                "regime": cell.regime,
                "diverged": why,
                "attacker": int(c.name in cell.cfg.federation.attack.sites),
                "clean_digest": clean,
            }
            for c in cell.cfg.data.clients
        ]
    summary = json.loads((folder / "run" / "summary.json").read_text())
    metrics = read_metrics(folder / "run" / "metrics.csv")
    execution = summary.get("execution", {})
    rows = []
    base = {
        "variant": cell.variant,
        "method": cell.method,
        "seed": cell.seed,
        "bytes_up_per_round": summary["comm"]["bytes_up_per_round"],
        "bytes_down_per_round": summary["comm"]["bytes_down_per_round"],
        "seconds_per_round": summary["time"]["seconds_per_round"],
        "seconds_total": summary["time"]["seconds_total"],
        "breaks_privacy": int(summary.get("breaks_privacy", False)),
        "config_digest": digest(cell.cfg),
        "regime": cell.regime,
        # Where the cell ran (a GPU's name, or cpu) and its peak GPU memory (empty on the CPU).
        "device_name": execution.get("name", execution.get("device", "")),
        "peak_memory_gib": execution.get("peak_memory_gib"),
        "refused": len(summary.get("refused", [])) if cell.kind == "attack" else None,
        "client_epsilon": summary.get("privacy", {}).get("client_level", {}).get("epsilon"),
        "clean_digest": clean,
        "max_train_cases": cell.cfg.data.max_train_cases,
        "safeguard_seconds": summary["time"].get("safeguard_seconds"),
    }
    spent = summary.get("privacy", {}).get("clients", {})
    if cell.kind != "loo":
        for name, c in summary["clients"].items():
            curve = [
                r["val_dice"]
                for r in metrics
                if r["client"] == name and r["stage"] in ("federated", "finetune")
            ]
            guard = c.get("safeguard", {})
            rows.append(
                {
                    **base,
                    "kind": cell.kind,
                    "client": name,
                    **{f"test_{k}": c["test"][k] for k in ("dice", "iou", "hd95_px", "case_dice")},
                    "best_round": c["best_round"],
                    "val_dice": next(iter(c["val"].values())),
                    "val_curve": ";".join(curve),
                    "attacker": int(name in cell.cfg.federation.attack.sites)
                    if cell.kind == "attack"
                    else None,
                    **{k: spent.get(name, {}).get(k) for k in ("epsilon", "delta")},
                    # Summaries from before privacy.dp.unit were per image.
                    "dp_unit": spent[name].get("unit", "image") if name in spent else None,
                    **{f"{s}_cases": c.get("n_cases", {}).get(s) for s in ("train", "test")},
                    "safeguard_choice": guard.get("choice"),
                    "safeguard_alpha": guard.get("alpha"),
                    "val_federated": guard.get("val", {}).get("federated"),
                    "val_local": guard.get("val", {}).get("local"),
                }
            )
        return rows
    adapt = json.loads((folder / "adapt" / "summary.json").read_text())
    for stage in ("zero_shot", "adapted", "local_only", "local_full"):
        t = adapt[stage]["test"]
        rows.append(
            {
                **base,
                "kind": "loo",
                "variant": f"{cell.method}:{stage}",
                "client": cell.heldout,
                **{f"test_{k}": t.get(k) for k in ("dice", "iou", "hd95_px", "case_dice")},
                "best_round": adapt[stage].get("best_epoch"),
                "val_dice": adapt[stage].get("val", {}).get("dice"),
            }
        )
    return rows


def case_rows(cell: Cell, folder: Path) -> list[dict[str, Any]]:
    """The cell's per-case test scores (``run/test_cases.csv``; none for cells that did not
    write one: leave-one-out, diverged, or run before runs wrote it), with the cell's identity
    and each client's number of training cases."""
    path = folder / "run" / "test_cases.csv"
    if cell.kind == "loo" or not path.is_file():
        return []
    summary = json.loads((folder / "run" / "summary.json").read_text())
    trained = {n: c.get("n_cases", {}).get("train") for n, c in summary["clients"].items()}
    base = {
        "regime": cell.regime,
        "kind": cell.kind,
        "variant": cell.variant,
        "method": cell.method,
        "seed": cell.seed,
        "max_train_cases": cell.cfg.data.max_train_cases,
        "config_digest": digest(cell.cfg),
    }
    return [{**base, **r, "train_cases": trained.get(r["client"])} for r in read_metrics(path)]


def finished_cells(out: Path) -> list[tuple[Cell, Path]]:
    """Every finished cell under ``out/cells`` (whatever spec produced it), with its folder."""
    found: list[tuple[Cell, Path]] = []
    for folder in sorted((out / "cells").glob("*")):
        if not (folder / "config.yaml").is_file():
            continue
        meta_path = folder / "cell.json"
        if not meta_path.is_file():
            continue
        meta = json.loads(meta_path.read_text())
        cfg = load_config(folder / "config.yaml")
        cell = Cell(
            meta["kind"],
            meta["variant"],
            meta["method"],
            meta["seed"],
            cfg,
            meta.get("heldout"),
            meta.get("regime", ""),
        )
        done = (
            (folder / "adapt" / "summary.json").is_file()
            if cell.kind == "loo"
            else (folder / "run" / "summary.json").is_file() or (folder / DIVERGED).is_file()
        )
        if done:
            found.append((cell, folder))
    return found


def collect(out: Path) -> list[dict[str, Any]]:
    """Rows of every finished cell under ``out/cells`` (whatever spec produced them)."""
    return [row for cell, folder in finished_cells(out) for row in cell_rows(cell, folder)]


def write_results(out: Path) -> Path:
    """``results.csv`` (one row per cell and client) and ``cases.csv`` (one per cell, client
    and test case) from every finished cell; returns the former."""
    cells = finished_cells(out)
    order = ("regime", "kind", "variant", "seed", "client")
    rows = [row for cell, folder in cells for row in cell_rows(cell, folder)]
    path = out / "results.csv"
    _write_csv(path, RESULT_FIELDS, sorted(rows, key=lambda r: tuple(r.get(k, "") for k in order)))
    cases = [row for cell, folder in cells for row in case_rows(cell, folder)]
    if cases:
        _write_csv(out / "cases.csv", CASE_RESULT_FIELDS, cases)
    return path


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k)) for k in fields})
    atomic_write_text(path, buf.getvalue())


#: What a cell may not start with, or a spreadsheet runs it as a formula (OWASP, CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
#: A number as ``_fmt`` writes one (also ``-0.5``, ``1e-05``, ``-inf``): never neutralised.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?|[+-]?(inf|nan)", re.IGNORECASE)


def _fmt(v: Any) -> Any:
    """A value as a CSV cell. A text cell that a spreadsheet would read as a formula (a client
    named ``=HYPERLINK(...)``) gets a leading ``'``, which makes it text; numbers, negative ones
    too, are written as they are."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, str) and v.startswith(FORMULA_START) and not _NUMBER.fullmatch(v):
        return "'" + v
    return v


# ------------------------------------------------------------------------------ examples


def save_examples(run_dir: Path, path: Path, per_client: int) -> None:
    """Predicted masks of a few fixed test images per client (for the report's image grid).

    Only masks and image names are stored, never images: the report reads the images from the
    data folder, which cannot be redistributed.
    """
    from fedoap.api import load_client_model
    from fedoap.data import prepare_clients
    from fedoap.training import predict_logits

    cfg = load_config(run_dir / "config.yaml")
    out: dict[str, np.ndarray] = {}
    for client in prepare_clients(cfg.data):
        idx = example_indices(client.test.y.numpy(), client.test.names, per_client)
        _, model = load_client_model(run_dir, client.name)
        x = client.test.x[idx].to(model.head.weight.device)
        pred = (predict_logits(model, x, cfg.train.precision) > 0).cpu()
        out[f"{client.name}/pred"] = pred[:, 0].numpy()
        out[f"{client.name}/names"] = client.test.names[idx].astype(str)
    with atomic_writer(path) as fh:
        np.savez_compressed(fh, **out)  # type: ignore[arg-type]


def example_indices(masks: np.ndarray, names: np.ndarray, k: int) -> np.ndarray:
    """k test images with lesions, spread over the range of lesion sizes (deterministic)."""
    area = masks.reshape(len(masks), -1).sum(1)
    cand = np.flatnonzero(area > 0)
    if len(cand) == 0:
        cand = np.arange(len(masks))
    order = cand[np.lexsort((names[cand], area[cand]))]
    pick = np.linspace(0, len(order) - 1, min(k, len(order))).round().astype(int)
    return order[pick]


def write_cell_meta(cell: Cell, out: Path) -> None:
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


__all__ = ["BenchSpec", "Cell", "load_spec", "plan", "run_bench", "write_results"]
