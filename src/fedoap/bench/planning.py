"""The plan of a benchmark: its cells (regimes x methods, variants, ablations, attacks and
leave-one-out, x seeds), each with its resolved config.

A cell's identity is its config's digest without execution details (:func:`digest`); with its
regime, variant and seed it names the cell's folder, ``OUT/cells/<key>/`` (:attr:`Cell.key`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

from fedoap.bench.spec import BenchSpec
from fedoap.config import Config, ConfigError, apply_overrides, from_dict, validate


@dataclass(frozen=True)
class Cell:
    kind: str  # main | ablation | loo | attack
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
    from fedoap.aggregation import build_aggregation
    from fedoap.training.device import resolve_precision

    build_aggregation(cfg)  # an unknown aggregation rule fails when the cell is planned

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
    """The variants' main cells in one regime. A ``methods`` selection (``--methods``) keeps the
    variants of those methods; their names are matched by ``--variants``."""
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
            raise ConfigError(f"--variants {p!r} matches no planned cell; the variants: {known}")
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
        if not grid.clients or not grid.defences:
            raise ConfigError("attacks: needs clients (the attackers) and defences")
        names = [d.name for d in grid.defences]
        if len(set(names)) != len(names) or not all(
            re.fullmatch(r"[A-Za-z0-9_-]+", n) for n in names
        ):
            raise ConfigError(f"attacks.defences: names must be distinct words, got {names}")
        attackers = "[" + ", ".join(grid.clients) + "]"
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
                                f"federation.attack.clients={attackers}",
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
