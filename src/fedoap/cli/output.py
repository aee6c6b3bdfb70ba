"""What the command line shows: its consoles, log records, one-line errors and the run
summary table."""

from __future__ import annotations

import errno
import logging
import sys
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedoap.errors import FedoapError

# Wide enough for the per-client table when output goes to a file or CI log.
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)

#: What the command line reports as a one-line error (exit code 2): the project's own error
#: types, and the machine's refusals (no space, a file past its size limit, no permission, a
#: read-only file system). Any other exception is a bug in fedoap and keeps its traceback.
USER_ERRORS = (FedoapError, OSError)
MACHINE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}
)


def setup_logging() -> None:
    """Show fedoap's log records (notes, progress, warnings) in the terminal through rich; a
    library user configures the ``fedoap`` logger as they like instead."""
    from rich.logging import RichHandler

    log = logging.getLogger("fedoap")
    if not any(getattr(h, "fedoap_cli", False) for h in log.handlers):
        handler = RichHandler(
            console=console, show_time=False, show_path=False, markup=False, highlighter=None
        )
        handler.fedoap_cli = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def fail(err: Exception) -> None:
    """Print ``err`` as one line and exit with code 2, or re-raise it when it is not the user's
    or the machine's doing (a bug: its traceback is what a report needs)."""
    if not isinstance(err, FedoapError) and not (
        isinstance(err, OSError) and err.errno in MACHINE_ERRNOS
    ):
        raise err
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    msg = "; ".join(lines) or type(err).__name__
    # escaped: a name in the message ("[/x]") is not Rich markup
    err_console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def fmt(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _per_patient(dp: dict[str, Any]) -> str:
    """A site's budget read per patient: under case-level DP the budget itself; per image, by
    group privacy over its largest case."""
    g = dp.get("patient_level")
    if not g:
        return "-"
    k = g["max_images_per_case"]
    if dp.get("unit") == "case":
        return "= ε (per case)"
    if k == 1:
        return "= per image"
    if not g["meaningful"]:
        return f"none (k={k})"  # its delta reaches 1
    return f"{g['epsilon']:.2f} (k={k})"  # its delta: summary.json


def _kept(sg: dict[str, Any] | None) -> str:
    """What a site's safeguard kept: federated, local, or the blend's alpha."""
    if not sg:
        return "-"
    return f"blend α={sg['alpha']:g}" if sg["choice"] == "interpolated" else sg["choice"]


def print_summary(summary: dict[str, Any], title: str) -> None:
    table = Table(title=title)
    # privacy.dp: the (epsilon, delta) each site spent, next to what it bought.
    spent = summary.get("privacy", {}).get("clients", {})
    guarded = "safeguard" in summary  # safeguard.mode: what each site kept
    cols = ["client", "train/val/test", "best round", "val", "test Dice", "IoU", "HD95 px"]
    cols += ["case Dice"] + (["ε (δ)", "per patient"] if spent else [])
    cols += ["kept"] if guarded else []
    for col in cols:
        table.add_column(col, justify="right" if col != "client" else "left")
    for name, c in summary["clients"].items():
        n = c["n"]
        dp = spent.get(name)
        table.add_row(
            name,
            f"{n['train']}/{n['val']}/{n['test']}",
            str(c["best_round"]),
            fmt(next(iter(c["val"].values()))),
            fmt(c["test"]["dice"]),
            fmt(c["test"]["iou"]),
            fmt(c["test"]["hd95_px"], 1),
            fmt(c["test"].get("case_dice")),
            *([f"{dp['epsilon']:.2f} ({dp['delta']:.1e})", _per_patient(dp)] if dp else []),
            *(["-", "-"] if spent and not dp else []),
            *([_kept(c.get("safeguard"))] if guarded else []),
        )
    m = summary["mean"]["test"]
    table.add_row(
        "[bold]mean",
        "",
        "",
        "",
        f"[bold]{fmt(m['dice'])}",
        fmt(m["iou"]),
        fmt(m["hd95_px"], 1),
        fmt(m["case_dice"]),
        *(["", ""] if spent else []),
        *([""] if guarded else []),
    )
    console.print(table)
    client_level = summary.get("privacy", {}).get("client_level")
    if client_level:
        console.print(
            f"client-level DP (DP-FedAvg): epsilon {client_level['epsilon']:.2f} at delta "
            f"{client_level['delta']:.2g} over {client_level['rounds']} rounds",
            highlight=False,
        )
    p, t, comm = summary["params"], summary["time"], summary["comm"]
    console.print(
        f"params shared/personal: {p['shared']:,}/{p['personal']:,}   "
        f"up/down per client-round: {comm['bytes_up_per_round'] / 1e6:.2f}/"
        f"{comm['bytes_down_per_round'] / 1e6:.2f} MB   "
        f"time: {t['seconds_total']:.0f} s ({t['seconds_per_round'] or 0:.1f} s/round)"
    )
    for name, why in summary.get("excluded", {}).items():
        console.print(
            f"[yellow]excluded:[/] {name} diverged in round {why['round']} ({why['stage']}) and "
            "has no results (train.on_divergence=exclude); the mean is over the others",
            highlight=False,
        )
    ex = summary.get("execution")
    if ex:
        where = ex.get("name", ex["device"])
        compiled = f", compiled ({ex['compile_mode']})" if ex.get("compile") else ""
        console.print(f"on {where}, {ex['precision']}{compiled}")
