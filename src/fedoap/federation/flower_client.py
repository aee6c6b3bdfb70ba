"""The ClientApp Flower starts for every message: a light relay to a long-lived site worker.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message (a persistent ClientApp
is an open request upstream, flwrlabs/flower#3670), and PyTorch's import alone costs seconds. So
on a deployment this ClientApp imports only Flower, numpy and safetensors, and hands each message
to the site's *worker*: one process per SuperNode that imports PyTorch and fedoap once, keeps the
site's model and data, and runs every step (:mod:`fedoap.federation.flower_worker`). The relay
starts the worker on the first message; the worker exits when its SuperNode is gone or after
``worker-idle-s`` seconds without a message (default 1800). The two talk over a Unix socket
that only this user can open: it lives in ``$TMPDIR/fedoap-workers-<uid>``, a folder that is
created with mode 0700 or, when it exists, used only if it is a real folder (not a symbolic
link) owned by this user with no access for anyone else; and each end checks that the process
at the other end runs as this user (``SO_PEERCRED``), so a socket planted by another user is
never spoken to. What the site computes is unchanged: the worker calls the same
handlers as the in-process ClientApp (:mod:`fedoap.federation.flower_site`).

In simulation (``partition-id`` in the node config) Flower keeps its worker processes, so the
steps run in this process; ``worker=false`` in a SuperNode's ``--node-config`` does the same on
a deployment.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import message_size_mod
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from fedoap.federation.flower_records import (
    claim_reply,
    numpy_record,
    plain,
    received_config,
    received_numpy,
    reply,
    step_records,
)
from fedoap.fileio import open_append
from fedoap.logs import log_to_stream

#: How long a worker waits for its first listening socket before the relay gives up.
WORKER_START_S = 300.0

logger = logging.getLogger(__name__)


def process_age() -> float | None:
    """Seconds since this process started (Linux), or None."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


# ------------------------------------------------------------------ the wire to the worker


def send_frame(conn: socket.socket, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """One message: a JSON header and the arrays as safetensors bytes, each length-prefixed."""
    head = json.dumps(header).encode()
    body = save_arrays({k: np.ascontiguousarray(v) for k, v in arrays.items()}) if arrays else b""
    conn.sendall(struct.pack("!QQ", len(head), len(body)) + head + body)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("the site worker closed the connection mid-message")
        buf += chunk
    return bytes(buf)


def recv_frame(conn: socket.socket) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    n_head, n_body = struct.unpack("!QQ", _recv_exact(conn, 16))
    header = json.loads(_recv_exact(conn, n_head))
    arrays = load_arrays(_recv_exact(conn, n_body)) if n_body else {}
    return header, arrays


# ------------------------------------------------------------------ the relay


class WorkerError(RuntimeError):
    """The site worker failed a step (its message carries the worker's error)."""


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def watched_processes() -> list[int]:
    """The processes whose end ends the worker: Flower's SuperExec (this relay's parent) and
    the SuperNode that started it (its parent, where /proc tells)."""
    parent = os.getppid()
    grand = _parent_of(parent)
    return [parent] + ([grand] if grand and grand > 1 else [])


def private_folder(folder: Path) -> Path:
    """``folder``, created with mode 0700, or checked to be a folder that only this user can
    open: not a symbolic link, owned by this user, no permission for group or others. Anything
    else is a :class:`WorkerError` naming it (another local user could have made it to listen
    on the worker's socket, or to read its log)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
    st = os.lstat(folder)
    problem = None
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "is not a folder"
    elif st.st_uid != os.getuid():
        problem = f"belongs to uid {st.st_uid}, not to this user (uid {os.getuid()})"
    elif st.st_mode & 0o077:
        problem = f"has mode {stat.S_IMODE(st.st_mode):o}; only its owner may open it (0700)"
    if problem:
        raise WorkerError(
            f"{folder} {problem}: the site worker's socket cannot be kept private there; "
            "remove it, or point TMPDIR elsewhere"
        )
    return folder


def worker_socket(node_config: dict[str, Any]) -> Path:
    """The worker socket of this SuperNode (the relay's parent) and node config."""
    key = json.dumps([os.getppid(), node_config], sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = private_folder(Path(tempfile.gettempdir()) / f"fedoap-workers-{os.getuid()}")
    return folder / f"{digest}.sock"


def foreign_uid(conn: socket.socket) -> int | None:
    """The user id of the process at the other end of a Unix socket when it is not this user;
    None when it is (or where the system cannot tell: SO_PEERCRED is Linux's)."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        return None
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, opt, 12))
    return None if uid == os.getuid() else int(uid)


def check_peer(conn: socket.socket, path: Path) -> None:
    """A :class:`WorkerError` unless the process at the other end runs as this user."""
    uid = foreign_uid(conn)
    if uid is not None:
        conn.close()
        raise WorkerError(
            f"{path}: the process listening there runs as uid {uid}, not as this user "
            f"(uid {os.getuid()}); refusing to send it the site's data"
        )


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        return None
    check_peer(conn, path)
    return conn


def _start_worker(path: Path, node_config: dict[str, Any]) -> socket.socket:
    """Start this SuperNode's worker and wait until it listens."""
    path.unlink(missing_ok=True)  # a dead worker's socket
    log = path.with_suffix(".log")
    idle = str(node_config.get("worker-idle-s", 1800))
    with open_append(log) as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedoap.federation.flower_worker",
                str(path),
                ",".join(str(p) for p in watched_processes()),
                idle,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    end = time.monotonic() + WORKER_START_S
    while time.monotonic() < end:
        conn = _connect(path)
        if conn is not None:
            return conn
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise WorkerError(f"the site worker exited with code {proc.returncode}: {tail}")
        time.sleep(0.05)
    proc.kill()
    raise WorkerError(f"the site worker did not listen on {path} within {WORKER_START_S:g} s")


def _ask_worker(
    node_config: dict[str, Any], header: dict[str, Any], arrays: dict[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, np.ndarray], float]:
    """Send one request to this SuperNode's worker (started if needed); returns its answer and
    the seconds spent starting it."""
    path = worker_socket(node_config)
    t0 = time.perf_counter()
    conn = _connect(path)
    started = 0.0
    if conn is None:
        conn = _start_worker(path, node_config)
        started = time.perf_counter() - t0
    with conn:
        send_frame(conn, header, arrays)
        answer, out = recv_frame(conn)
    if "error" in answer:
        raise WorkerError(str(answer["error"]))
    return answer, out, started


def _in_this_process(context: Context) -> bool:
    nc = context.node_config
    return "partition-id" in nc or str(nc.get("worker", "true")).lower() in ("false", "0", "no")


_HANDLED = 0  # step messages this process has handled in itself (the first pays its start)


def _first_startup() -> float:
    """The seconds this process took to start, for its first step; 0 for later ones (Flower's
    simulation keeps its processes)."""
    global _HANDLED
    age = (process_age() or 0.0) if _HANDLED == 0 else 0.0
    _HANDLED += 1
    return age


client_app = ClientApp(mods=[message_size_mod])


# The site's handlers are imported only where a step runs in this process: the relay imports no
# PyTorch.


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    log_to_stream()  # into the SuperNode's log, with each record's level
    if _in_this_process(context):
        from fedoap.federation.flower_site import query_handler

        return query_handler(msg, context)
    nc = plain(context.node_config)
    header = {"kind": "query", "node_config": nc, "config": received_config(msg)}
    answer, _, _ = _ask_worker(nc, header, {})
    return claim_reply(msg, answer["metrics"])


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    log_to_stream()
    if _in_this_process(context):
        from fedoap.federation.flower_site import train_handler

        return train_handler(msg, context, _first_startup())
    age = process_age() or 0.0
    arrays = received_numpy(msg)
    nc = plain(context.node_config)
    header = {"kind": "train", "node_config": nc, "config": received_config(msg)}
    answer, upload, started = _ask_worker(nc, header, arrays)
    result = json.loads(answer["result"])
    if result.get("note"):
        logger.info(result["note"])  # into the SuperNode's log
    # This relay's own start (Flower starts one per message) and the worker's, if it started.
    result["seconds"]["startup"] = age + started + result["seconds"].get("startup", 0.0)
    content = step_records(
        json.dumps(result),
        numpy_record(upload),
        int(answer.get("num_examples", 0)),
        float(answer.get("train_loss", 0.0)),
    )
    return reply(msg, content)


__all__ = ["client_app"]
