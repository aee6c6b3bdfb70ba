"""A benchmark spec: the YAML that names the base run config(s) and the matrix of cells.

:func:`load_spec` reads it, checks every name that will name a cell folder (regimes, variants,
ablations, leave-one-out's held-out clients) and loads the base run config of each regime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedoap.config import Config, ConfigError, from_dict, key, load_config, load_yaml
from fedoap.fileio import SAFE_NAME, safe_name


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
    """Attacks x defences: each ``kinds`` attack by ``clients``, and the clean run, under each
    defence (a name and config overrides), for each method and seed. Every cell is a full run;
    the report compares the honest clients' test Dice with the clean run's."""

    # The attacking clients (federation.attack.clients of the attack cells).
    clients: tuple[str, ...] = key((), was="sites")
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
