"""The project file of a Flower federation: where the SuperLink listens, which hospitals take
part (each a client of the run config, with a hint of where its data lies), the run config,
and when a round goes ahead without every site (k of n). Every error names the file and key.

.. code-block:: yaml

    server:
      address: fl.example.org:9092     # host:port the sites connect to
      # ca_cert: /pki/ca.crt            # optional: your own CA (with ca_key to sign the
      # ca_key: /pki/ca.key             # SuperLink's certificate), or your own server_cert
      # server_cert: /pki/server.pem    # and server_key
      # server_key: /pki/server.key
    run:
      config: configs/federation4.yaml  # relative to this file
      overrides: [federation.rounds=10]
    federation:                         # k of n: a round goes ahead when this share replies
      min_fit_fraction: 0.75
      round_timeout_s: 900
    sites:
      - {name: brain_mri, data: /data/lgg_brain_mri.npz}
      - {name: breast_us, data: /data/busi_breast_us.npz, device: cuda}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedoap.config import Config, ConfigError, load_config

#: The project file's keys, per section.
KEYS = {
    "": {"name", "server", "run", "federation", "sites"},
    "server": {"address", "ca_cert", "ca_key", "server_cert", "server_key"},
    "run": {"config", "overrides"},
    "federation": {"min_fit_fraction", "round_timeout_s"},
    "site": {"name", "data", "output", "device"},
}
ADDRESS = re.compile(r"^(?P<host>[A-Za-z0-9.\-]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class SiteSpec:
    name: str
    data: str  # where the site's data lies at the site (its IT team may change it)
    output: str | None = None  # where the site keeps its state and model (default: its kit)
    device: str | None = None


@dataclass(frozen=True)
class Project:
    name: str
    host: str
    port: int
    sites: tuple[SiteSpec, ...]
    config: Config  # the run config, with the project's overrides and k-of-n settings
    pki: dict[str, Path]  # supplied certificates and keys (ca_cert, ca_key, server_cert, ...)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def load_project(path: Path) -> Project:
    """Read and check a project file; raises :class:`ConfigError` naming the file and key."""
    if not path.is_file():
        raise ConfigError(f"project file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    where = str(path)
    doc = _mapping(raw, where, "")
    server = _mapping(doc.get("server"), where, "server")
    run = _mapping(doc.get("run"), where, "run")
    federation = _mapping(doc.get("federation", {}), where, "federation")
    m = ADDRESS.match(str(server.get("address", "")))
    if m is None or not 0 < int(m["port"]) < 65536:
        raise ConfigError(
            f"{where}: server.address: host:port the sites connect to, e.g. fl.example.org:9092 "
            f"(got {server.get('address')!r})"
        )
    files = sorted(KEYS["server"] - {"address"})
    pki = {k: _file(path, server[k], f"server.{k}") for k in files if k in server}
    if ("server_cert" in pki) != ("server_key" in pki):
        raise ConfigError(f"{where}: server.server_cert and server.server_key come together")
    if "ca_key" in pki and "ca_cert" not in pki:
        raise ConfigError(f"{where}: server.ca_key needs server.ca_cert")
    if "server_cert" in pki and "ca_cert" not in pki:
        raise ConfigError(
            f"{where}: server.server_cert needs the CA that signed it (server.ca_cert)"
        )
    if "ca_cert" in pki and "server_cert" not in pki and "ca_key" not in pki:
        raise ConfigError(
            f"{where}: server.ca_cert: give server.ca_key to sign the SuperLink's certificate, "
            "or server.server_cert and server.server_key"
        )
    if "config" not in run:
        raise ConfigError(f"{where}: run.config: the fedoap config of the run is required")
    overrides = [str(o) for o in run.get("overrides") or []]
    for k, v in federation.items():
        overrides.append(f"federation.{k}={v}")
    try:
        cfg = load_config(_file(path, run["config"], "run.config"), overrides)
    except ConfigError as err:
        raise ConfigError(f"{where}: run: {err}") from None
    sites_raw = doc.get("sites")
    if not isinstance(sites_raw, list) or not sites_raw:
        raise ConfigError(f"{where}: sites: a list of the sites, one per client of the run config")
    clients = [c.name for c in cfg.data.clients]
    sites = []
    for i, s in enumerate(sites_raw):
        s = _mapping(s, where, f"sites[{i}]", KEYS["site"])
        name = str(s.get("name", ""))
        if name not in clients:
            raise ConfigError(
                f"{where}: sites[{i}].name: {name!r} is not a client of the run config "
                f"({', '.join(clients)})"
            )
        if "data" not in s:
            raise ConfigError(f"{where}: sites[{i}].data: where the site's data lies is required")
        sites.append(
            SiteSpec(
                name,
                str(s["data"]),
                None if s.get("output") is None else str(s["output"]),
                None if s.get("device") is None else str(s["device"]),
            )
        )
    names = [s.name for s in sites]
    missing = [c for c in clients if c not in names]
    if missing or len(set(names)) != len(names):
        raise ConfigError(
            f"{where}: sites: each client of the run config once (missing: {missing or 'none'}, "
            f"given: {names})"
        )
    project_name = str(doc.get("name") or path.stem)
    return Project(project_name, m["host"], int(m["port"]), tuple(sites), cfg, pki)


def _mapping(value: Any, where: str, section: str, keys: set[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {section or 'the file'}: a mapping is expected")
    allowed = keys if keys is not None else KEYS[section]
    unknown = sorted(set(value) - allowed)
    if unknown:
        prefix = f"{section}." if section else ""
        raise ConfigError(
            f"{where}: unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(allowed))})"
        )
    return dict(value)


def _file(project: Path, value: Any, key: str) -> Path:
    path = Path(str(value))
    path = path if path.is_absolute() else project.parent / path
    if not path.is_file():
        raise ConfigError(f"{project}: {key}: file not found: {path}")
    return path.resolve()
