"""``fedoap provision`` and ``fedoap deploy``: a Flower federation from a project file, run by
an operator (:mod:`fedoap.deploy`)."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from fedoap.cli.output import USER_ERRORS, console, fail

deploy_app = typer.Typer(
    no_args_is_help=True,
    help="Run a provisioned federation from the operator kit (wrappers around flwr).",
)


def provision(
    project: Path = typer.Option(..., "--config", "-c", help="the project file (YAML)"),
    out: Path = typer.Option(..., "--out", "-o", help="a new folder for the kits"),
) -> None:
    """Write the operator's kit and one kit per site from a project file."""
    from fedoap.deploy.kits import provision as write_kits
    from fedoap.deploy.project import load_project

    try:
        kits = write_kits(load_project(project), out)
    except (*USER_ERRORS, OSError) as err:
        fail(err)
        return
    for name, folder in kits.items():
        console.print(f"wrote {folder}" + ("" if name == "operator" else f" (site {name})"))
    console.print(
        f"next: send each site its folder; on the server run "
        f"{kits['operator']}/start-superlink.sh, then fedoap deploy run --kit {kits['operator']}",
        highlight=False,
    )


def _kit(folder: Path, port: int | None = None):  # -> OperatorKit
    from fedoap.deploy.operate import OperatorKit

    return OperatorKit(folder, port)


KIT = typer.Option(..., "--kit", help="the operator kit (fedoap provision's OUT/operator)")


@deploy_app.command("run")
def deploy_run(
    kit: Path = KIT,
    run_dir: Path | None = typer.Option(None, "--run-dir", help="default: KIT/runs/run-N"),
    resume: bool = typer.Option(False, "--resume", help="resume the run in --run-dir"),
    timeout: float = typer.Option(math.inf, "--timeout", help="seconds to wait at most"),
) -> None:
    """Submit the study, wait until it finishes, and show each site's test Dice."""
    import json

    try:
        folder, run = _kit(kit).run(run_dir, resume=resume, timeout=timeout)
    except (*USER_ERRORS, OSError, TimeoutError) as err:
        fail(err)
        return
    summary = json.loads((folder / "summary.json").read_text())
    for name, c in summary["clients"].items():
        console.print(f"{name:16s} test Dice {c['test']['dice']:.3f}", highlight=False)
    console.print(f"run {run['run-id']}: {run['status']}; its folder: {folder}", highlight=False)


@deploy_app.command("status")
def deploy_status(kit: Path = KIT) -> None:
    """The SuperLink's runs and their status."""
    try:
        runs = _kit(kit).status()
    except (*USER_ERRORS, OSError) as err:
        fail(err)
        return
    for r in runs:
        console.print(f"{r['run-id']}  {r['status']}", highlight=False)


@deploy_app.command("stop")
def deploy_stop(kit: Path = KIT, run_id: str = typer.Argument(..., help="the run to stop")) -> None:
    """Stop a run."""
    try:
        _kit(kit).stop(run_id)
    except (*USER_ERRORS, OSError) as err:
        fail(err)
        return
    console.print(f"stopped run {run_id}")


@deploy_app.command("register")
def deploy_register(
    kit: Path = KIT,
    port: int | None = typer.Option(None, "--port", help="the SuperLink's port (default: kit's)"),
) -> None:
    """Wait for the SuperLink, then register every site's public key (start-superlink.sh
    runs this)."""
    try:
        done = _kit(kit, port).register()
    except (*USER_ERRORS, OSError) as err:
        fail(err)
        return
    console.print(f"registered: {', '.join(done) or 'none new'}", highlight=False)
