"""``fedoap provision``: from a project file, the kits a federation starts from.

``OUT/operator/`` is the SuperLink host's: the CA, the SuperLink's certificate and key, every
site's *public* key, the resolved run config, ``start-superlink.sh`` (which also registers the
sites' keys) and a README. ``OUT/sites/<name>/`` is one hospital's: the CA certificate (never a
key of the CA), its own key pair, ``start-site.sh`` (a SuperNode with the site's node config and
the offline settings, restarted when it stops) and a README for its IT team. No kit holds a
secret of another party.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from fedoap.deploy.pki import load_ca, make_ca, make_node_keys, make_server_cert
from fedoap.deploy.project import Project, SiteSpec
from fedoap.errors import OutputError
from fedoap.federation.flower_launch import OFFLINE_ENV, FlowerCLI
from fedoap.fileio import check_output_dir

#: The name of the SuperLink connection in the operator kit's Flower profile.
CONNECTION = "fedoap"
#: The kit's description, which ``fedoap deploy`` reads.
KIT_FILE = "kit.json"


def provision(project: Project, out: Path) -> dict[str, Path]:
    """Write the operator's kit and one kit per site under ``out`` (a new or empty folder);
    returns the kits' folders by name (``operator`` and each site's)."""
    check_output_dir(out)
    if out.exists() and any(out.iterdir()):
        raise OutputError(f"{out} is not empty: provision into a new folder")
    operator, sites = out / "operator", out / "sites"
    ca_cert, ca_key = operator / "pki" / "ca.crt", operator / "pki" / "ca.key"
    server_cert = operator / "superlink" / "server.pem"
    server_key = operator / "superlink" / "server.key"
    pki = project.pki
    if "ca_cert" in pki:
        ca_cert.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pki["ca_cert"], ca_cert)
    if "server_cert" in pki:  # the hospital's own certificate for the SuperLink
        server_cert.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pki["server_cert"], server_cert)
        shutil.copyfile(pki["server_key"], server_key)
        server_key.chmod(0o600)
    else:
        if "ca_cert" in pki:
            ca, key = load_ca(pki["ca_cert"], pki["ca_key"])  # a supplied CA key stays where it is
        else:
            ca, key = make_ca(ca_cert, ca_key, f"{project.name} CA")
        make_server_cert(ca, key, project.host, server_cert, server_key)
    (operator / "node-keys").mkdir(parents=True, exist_ok=True)
    (operator / "config.yaml").write_text(project.config.to_yaml())
    kits = {"operator": operator}
    for site in project.sites:
        kit = sites / site.name
        private, public = make_node_keys(kit, site.name)
        shutil.copyfile(public, operator / "node-keys" / public.name)
        shutil.copyfile(ca_cert, kit / "ca.crt")
        _script(kit / "start-site.sh", _site_script(project, site))
        (kit / "README.md").write_text(_site_readme(project, site))
        (kit / KIT_FILE).write_text(
            json.dumps({"role": "site", "site": site.name, "address": project.address}, indent=1)
        )
        kits[site.name] = kit
    _script(operator / "start-superlink.sh", _superlink_script(project))
    # The flwr CLI's connection profile (FLWR_HOME=operator/flwr-home flwr list fedoap);
    # fedoap deploy rewrites it with the kit's own path wherever the kit was moved.
    FlowerCLI(operator / "flwr-home", CONNECTION, operator).write_profile(
        f"localhost:{project.port}", (operator / "pki" / "ca.crt").resolve()
    )
    (operator / "README.md").write_text(_operator_readme(project))
    description = {
        "role": "operator",
        "project": project.name,
        "address": project.address,
        "connection": CONNECTION,
        "sites": [s.name for s in project.sites],
    }
    (operator / KIT_FILE).write_text(json.dumps(description, indent=1) + "\n")
    return kits


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _exports() -> str:
    return "export " + " ".join(f"{k}={v}" for k, v in OFFLINE_ENV.items())


def _superlink_script(project: Project) -> str:
    return f"""#!/usr/bin/env bash
# The SuperLink of {project.name}: TLS, SuperNode authentication, its state in state/. Once it
# listens, every site's public key in node-keys/ is registered (only they can connect). Stop it
# with Ctrl-C or by its PID; start it again to resume: its database keeps the registrations.
#   FEDOAP_SUPERLINK_PORT overrides the port ({project.port}).
set -euo pipefail
cd "$(dirname "$0")"
{_exports()}
export FLWR_HOME="$PWD/flwr-home"
PORT="${{FEDOAP_SUPERLINK_PORT:-{project.port}}}"
mkdir -p state
flower-superlink --ssl-ca-certfile pki/ca.crt --ssl-certfile superlink/server.pem \\
  --ssl-keyfile superlink/server.key --enable-supernode-auth \\
  --disable-runtime-dependency-installation --port "$PORT" --database state/superlink.db &
superlink=$!
trap 'kill "$superlink" 2>/dev/null' EXIT INT TERM
fedoap deploy register --kit . --port "$PORT"
wait "$superlink"
"""


def _site_script(project: Project, site: SiteSpec) -> str:
    name, data = site.name, site.data
    output = site.output or "$PWD/output"
    device = f' device=\\"{site.device}\\"' if site.device else ""
    return f"""#!/usr/bin/env bash
# The SuperNode of site {name} in {project.name}. It connects to {project.address} over TLS
# (ca.crt), proves who it is with {name}.key, trains on the data at FEDOAP_DATA_PATH and keeps
# its state and model in FEDOAP_OUTPUT_DIR. When it stops (the SuperLink restarted, the network
# failed), it starts again after FEDOAP_RESTART_S seconds; the site rejoins where it left off.
set -uo pipefail
cd "$(dirname "$0")"
{_exports()}
DATA_PATH="${{FEDOAP_DATA_PATH:-{data}}}"
OUTPUT_DIR="${{FEDOAP_OUTPUT_DIR:-{output}}}"
SUPERLINK="${{FEDOAP_SUPERLINK:-{project.address}}}"
NODE_CONFIG="client-name=\\"{name}\\" data-path=\\"$DATA_PATH\\""
NODE_CONFIG="$NODE_CONFIG output-dir=\\"$OUTPUT_DIR\\"{device}"
mkdir -p "$OUTPUT_DIR"
while true; do
  flower-supernode --superlink "$SUPERLINK" --root-certificates ca.crt \\
    --auth-supernode-private-key {shlex.quote(name)}.key \\
    --port "${{FEDOAP_SUPERNODE_PORT:-9094}}" --node-config "$NODE_CONFIG"
  echo "flower-supernode exited with $?; restarting in ${{FEDOAP_RESTART_S:-10}} s" >&2
  sleep "${{FEDOAP_RESTART_S:-10}}"
done
"""


def _site_readme(project: Project, site: SiteSpec) -> str:
    name, data = site.name, site.data
    return f"""# Site kit: {name} ({project.name})

This folder lets this hospital take part in the federated study {project.name}. It trains a
segmentation model on this site's images; only model weights (the shared parts of the model)
leave the site, to the study's server at {project.address}. The images, the masks, this site's
personal model parts and its selected model stay here.

## What is in it

| file | what it is |
|---|---|
| `start-site.sh` | starts this site's Flower SuperNode and restarts it when it stops |
| `{name}.key` | this site's private key: it proves to the server that this node is \
{name}. Keep it here (mode 600); never send it anywhere |
| `{name}.pub` | its public key; the server already has a copy |
| `ca.crt` | the certificate of the study's CA, which the server's TLS certificate is \
checked against |

## Before starting

1. Python 3.11 or later and fedoap with Flower, the same release as the server:
   `python -m pip install 'fedoap[flower]'`.
2. The data: `{data}` (an `.npz` file, a folder of image/mask pairs, or a volume dataset in the
   layout the study uses). Set `FEDOAP_DATA_PATH` if it lies elsewhere.
3. The network: outbound TLS to `{project.address}` (no inbound port is needed).

## Start, stop

```bash
./start-site.sh                                  # in the foreground; Ctrl-C stops it
FEDOAP_DATA_PATH=/data/images ./start-site.sh    # data elsewhere
```

To keep it running, start it as a service, e.g. a systemd unit with
`ExecStart=/path/to/this/kit/start-site.sh` and `Restart=always`. `FEDOAP_OUTPUT_DIR` (default:
`output/` here) holds this site's state and selected model; keep it between restarts: the site
rejoins a running study from it. The script runs offline (no dependency installation, no
telemetry).
"""


def _operator_readme(project: Project) -> str:
    sites = "\n".join(f"| {s.name} | `{s.data}` |" for s in project.sites)
    return f"""# Operator kit: {project.name}

The server side of the study: the SuperLink at {project.address}, the run config, and the
commands that run the study. The sites' kits are in `../sites/<name>/`: send each site its own
folder (it holds that site's private key, and nothing of any other site).

| site | data, as the project file gave it |
|---|---|
{sites}

## Run the study

```bash
./start-superlink.sh            # on the server host; registers every site's key, then serves
fedoap deploy run --kit .       # in another shell on the same host, once the sites have started
```

`fedoap deploy run` writes the run folder (default `runs/run-N` here: `config.yaml`,
`metrics.csv`, `summary.json`, checkpoints), submits the run and waits for it to finish.
`fedoap deploy status --kit .` lists the runs; `fedoap deploy stop --kit . RUN_ID` stops one;
`fedoap deploy run --kit . --resume RUN_DIR` resumes a run whose ServerApp was killed.

A round goes ahead when `federation.min_fit_fraction` of the sites reply within
`federation.round_timeout_s` seconds (`config.yaml`); a site that comes back rejoins.

## What is in it

| file | what it is |
|---|---|
| `pki/ca.crt` | the study's CA certificate (sent to every site) |
| `pki/ca.key` | the CA's private key, if this kit made the CA: keep it offline |
| `superlink/server.pem`, `superlink/server.key` | the SuperLink's TLS certificate and key |
| `node-keys/<site>.pub` | each site's public key, registered by `start-superlink.sh` |
| `config.yaml` | the resolved run config |
| `kit.json` | what `fedoap deploy` reads |
| `flwr-home/config.toml` | the `flwr` CLI's profile: `FLWR_HOME=flwr-home flwr list fedoap` |
"""
