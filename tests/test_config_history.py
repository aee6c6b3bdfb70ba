"""A config key's history (fedoap.config.keys, fedoap.config.identity): keys added later leave
every earlier digest as it was, and renamed keys are still read under their old name, from
configs, run folders, benchmark cells and checkpoints, with the same identity."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from fedoap.algorithms import build_algorithm
from fedoap.bench import finished_cells, load_spec, plan
from fedoap.config import (
    Config,
    ConfigError,
    RenamedKeyWarning,
    digest_view,
    key,
    load_config,
    ranged,
    undeclared_keys,
)
from fedoap.config.identity import V1_SECTIONS_WHEN_SET, V1_WHEN_SET
from fedoap.federation.server import Server
from fedoap.federation.state import RunState, load_run_state, save_run_state
from fedoap.runs import RunDir
from fedoap.training.device import Timer
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]

#: The digest of every shipped config: results and checkpoints made with them carry these.
SHIPPED_DIGESTS = {
    "federation4.yaml": "a2ac27290817",
    "lgg-scarcity.yaml": "4c36c593bf28",
    "lgg-sites.yaml": "21640c2312de",
    "paper-long.yaml": "4ba5c2af7b30",
    "paper.yaml": "50aa4e4c91bb",
    "polyp-sites.yaml": "e60a06aaae29",
    "quickstart.yaml": "f60259023348",
}


@contextlib.contextmanager
def notes() -> Iterator[list[str]]:
    """The renamed-key notes given inside the block (filled when it ends)."""
    got: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield got
    got += [str(w.message) for w in caught if issubclass(w.category, RenamedKeyWarning)]


@pytest.mark.parametrize("name", sorted(SHIPPED_DIGESTS))
def test_shipped_configs_keep_their_digest(name):
    assert load_config(REPO / "configs" / name).digest() == SHIPPED_DIGESTS[name]


def test_every_key_added_after_version_1_declares_its_version():
    """A key that version 1 did not have and that declares no ``since`` would enter every
    digest and change it: every earlier run would lose its identity."""
    assert undeclared_keys(Config) == []


def test_a_key_added_later_counts_only_when_set():
    cfg = tiny_config()
    # The same config with one more key, declared as added in version 2.
    declared = dataclasses.make_dataclass(
        "Declared", [("extra", int, ranged(3, ge=0, since=2))], bases=(Config,), frozen=True
    )
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Config)}
    assert declared(**fields).digest() == cfg.digest()
    assert declared(**fields, extra=4).digest() != cfg.digest()
    # Undeclared, it would change every digest: the check names it.
    undeclared = dataclasses.make_dataclass(
        "Undeclared", [("extra", int, key(3))], bases=(Config,), frozen=True
    )
    assert undeclared(**fields).digest() != cfg.digest()
    assert undeclared_keys(undeclared) == ["extra: added after version 1 without since=2"]
    no_default = dataclasses.make_dataclass(
        "NoDefault", [("extra", int, key(since=2))], bases=(Config,), frozen=True, kw_only=True
    )
    assert undeclared_keys(no_default) == ["extra: added after version 1 without a default"]


def test_version_1_defaults_are_the_schemas():
    """The frozen defaults of version 1 are the schema's: at the schema's defaults, every key
    that version 1 leaves out at its default is out of what is hashed."""
    view = digest_view(tiny_config())
    for dotted in V1_WHEN_SET:
        section, rest = dotted.split(".", 1)
        if section in V1_SECTIONS_WHEN_SET:
            assert section not in view or not view[section], dotted
        elif rest.startswith("clients[]."):
            name = rest.removeprefix("clients[].")
            assert all(name not in c for c in view[section]["clients"]), dotted
        else:
            where = view[section]
            *parents, last = rest.split(".")
            for part in parents:
                where = where[part]
            assert last not in where, dotted


def _old_spelling(data: dict) -> dict:
    """A config dict as files wrote it before the renames."""
    fed = data.setdefault("federation", {})
    if "num_byzantine" in fed:
        fed["byzantine"] = fed.pop("num_byzantine")
    attack = fed.get("attack", {})
    if "clients" in attack:
        attack["sites"] = attack.pop("clients")
    return data


def test_an_old_key_config_loads_to_the_same_config_and_digest(tmp_path):
    new = tiny_config(
        "federation.aggregator=multi_krum",
        "federation.num_byzantine=0",
        "federation.attack.clients=[ct]",
        "federation.attack.kind=sign_flip",
    )
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(_old_spelling(new.to_dict())))
    (tmp_path / "new.yaml").write_text(new.to_yaml())
    with notes() as noted:
        old = load_config(tmp_path / "old.yaml")
    assert noted == [
        "config key federation.byzantine is now called federation.num_byzantine: read as "
        "federation.num_byzantine",
        "config key federation.attack.sites is now called federation.attack.clients: read as "
        "federation.attack.clients",
    ]
    assert old == load_config(tmp_path / "new.yaml") == new
    assert old.digest() == new.digest()
    saved = old.to_yaml()  # written with the current names
    assert "num_byzantine: 0" in saved and not re.search(r"^ +byzantine:", saved, re.M)
    # An old override, on either spelling of the file; it replaces the key under any name.
    with notes() as noted:
        again = load_config(tmp_path / "new.yaml", ["federation.attack.sites=[us]"])
    assert again.federation.attack.clients == ("us",) and len(noted) == 1
    with notes():
        again = load_config(tmp_path / "old.yaml", ["federation.attack.clients=[us]"])
    assert again.federation.attack.clients == ("us",) and again.digest() != new.digest()
    # Both names in one file: which one is meant cannot be told.
    both = new.to_dict()
    both["federation"]["byzantine"] = 0
    (tmp_path / "both.yaml").write_text(yaml.safe_dump(both))
    with pytest.raises(ConfigError, match="federation.byzantine and federation.num_byzantine"):
        load_config(tmp_path / "both.yaml")


def test_committed_benchmark_cells_with_old_keys_keep_their_identity():
    """The robustness benchmark's cells were written with federation.attack.sites and
    federation.byzantine: they load, and each still has the key its folder is named by."""
    out = REPO / "benchmarks" / "results" / "robustness"
    if not (out / "cells").is_dir():
        pytest.skip(f"no committed results at {out}")
    with notes() as noted:
        found = finished_cells(out)
    assert found and noted
    attackers = set()
    for cell, folder in found:
        assert folder.name == cell.key
        assert re.search(r"^ +byzantine:", (folder / "config.yaml").read_text(), re.M)
        attackers |= set(cell.cfg.federation.attack.clients)
    assert attackers == {"breast_us"}


def test_a_spec_with_the_old_attack_key_plans_the_same_cells(tmp_path):
    (tmp_path / "base.yaml").write_text(tiny_config().to_yaml())

    def spec(attackers: str, byzantine: str) -> Path:
        krum = ["federation.aggregator=krum", f"federation.{byzantine}=0"]
        defences = [{"name": "median", "overrides": ["federation.aggregator=median"]}]
        attacks = {
            attackers: ["ct"],
            "kinds": ["scale"],
            "defences": [*defences, {"name": "krum", "overrides": krum}],
        }
        path = tmp_path / f"{attackers}.yaml"
        base = {"base": "base.yaml", "methods": ["fedavg"], "seeds": [0], "attacks": attacks}
        path.write_text(yaml.safe_dump(base))
        return path

    new = plan(*load_spec(spec("clients", "num_byzantine")), kinds=("attack",))
    with notes() as noted:
        old = plan(*load_spec(spec("sites", "byzantine")), kinds=("attack",))
    assert any("attacks.sites is now called attacks.clients" in n for n in noted)
    assert [c.key for c in old] == [c.key for c in new] and len(new) == 4
    assert all(c.cfg.federation.attack.clients == ("ct",) for c in new if c.variant[-5:] == "scale")


class _Still:
    """A transport with nothing to say: enough for a server to restore a checkpoint."""

    runtime, trusted, label = "inprocess", True, ""

    def restore_history(self, history):
        pass

    def restore_sites(self, rs):
        pass


def test_an_old_checkpoint_with_refused_site_still_restores(tmp_path):
    """Checkpoints (and summary.json) once named a refused upload's client ``site``: a run
    with such a checkpoint, and its old-key config, still resumes, and reads it as ``client``."""
    new = tiny_config("federation.attack.clients=[ct]", "federation.attack.kind=scale")
    old_yaml = tmp_path / "config.yaml"
    old_yaml.write_text(yaml.safe_dump(_old_spelling(new.to_dict())))
    with notes():
        old = load_config(old_yaml)
    alg = build_algorithm(old)
    model = alg.build_model()
    refused = [{"round": 1, "site": "ct", "reason": "update norm 7735 is 960 x the median"}]
    history = {
        "elapsed": 1.0,
        "rows": [],
        "round_seconds": [1.0],
        "bytes_up": [],
        "bytes_down": [],
        "refused": refused,
    }
    rd = RunDir(tmp_path)
    save_run_state(rd, RunState(old.digest(), alg.init_global(model), done=1, history=history))
    rs = load_run_state(rd, new.digest())  # the digest the old run recorded still matches
    names = [c.name for c in new.data.clients]
    server = Server(
        new,
        alg,
        _Still(),  # type: ignore[arg-type]
        rd,
        names,
        dict.fromkeys(names, 10),
        model,
        Timer(torch.device("cpu")),
    )
    server.restore(rs)
    assert server.refused == [{"round": 1, "client": "ct", "reason": refused[0]["reason"]}]
