"""A site's long-lived worker on a Flower deployment (see :mod:`fedoap.federation.flower_client`).

``python -m fedoap.federation.flower_worker SOCKET PIDS IDLE_S``: imports PyTorch and
fedoap once, listens on the Unix socket ``SOCKET`` (mode 0600), and answers one request at a
time with the same handlers as the in-process ClientApp
(:func:`fedoap.federation.flower_site.identify` and
:func:`~fedoap.federation.flower_site.run_step`), so the site's model and data are built once per
worker. It exits when any of ``PIDS`` (comma-separated: Flower's SuperExec and the SuperNode) is
gone or after ``IDLE_S`` seconds without a request, and removes its socket.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedoap.federation.flower_client import foreign_uid, process_age, recv_frame, send_frame
from fedoap.federation.flower_site import identify, run_step
from fedoap.logs import log_to_stream

logger = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def answer(
    header: dict[str, Any], arrays: dict[str, np.ndarray], startup: float
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    nc, config = header["node_config"], header["config"]
    if header["kind"] == "query":
        return {"metrics": identify(nc, config)}, {}
    global_arrays = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
    result, update = run_step(nc, config, global_arrays, startup)
    if update is None:
        return {"result": json.dumps(result)}, {}
    out = {k: v.detach().cpu().numpy() for k, v in update.arrays.items()}
    return {
        "result": json.dumps(result),
        "num_examples": update.num_examples,
        "train_loss": float(update.metrics["train_loss"]),
    }, out


def serve(path: Path, watched: list[int], idle_s: float) -> None:
    startup = process_age() or 0.0  # charged to the first step
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.unlink(missing_ok=True)
    old = os.umask(0o177)
    try:
        server.bind(str(path))
    finally:
        os.umask(old)
    server.listen(1)
    server.settimeout(1.0)
    logger.info(f"site worker {os.getpid()} listening on {path}, watching {watched}")
    last = time.monotonic()
    try:
        while all(_alive(p) for p in watched) and time.monotonic() - last < idle_s:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                uid = foreign_uid(conn)
                if uid is not None:  # not our relay: say nothing
                    logger.warning(f"site worker: refused a connection from uid {uid}")
                    continue
                conn.settimeout(None)
                header, arrays = recv_frame(conn)
                try:
                    out, out_arrays = answer(header, arrays, startup)
                    startup = 0.0
                except Exception as err:  # reported to the relay, which fails the message
                    traceback.print_exc()
                    name = f"{type(err).__module__}.{type(err).__name__}"
                    out, out_arrays = {"error": f"{name}: {err}"}, {}
                send_frame(conn, out, out_arrays)
            last = time.monotonic()
    finally:
        server.close()
        path.unlink(missing_ok=True)
        logger.info(f"site worker {os.getpid()} stopped")


if __name__ == "__main__":
    log_to_stream()
    serve(Path(sys.argv[1]), [int(p) for p in sys.argv[2].split(",")], float(sys.argv[3]))
