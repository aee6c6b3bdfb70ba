"""How many CPU cores this process may use, for sharing them among parallel runs."""

from __future__ import annotations

import os


def cpu_budget() -> int:
    """The cores this process may use: ``OMP_NUM_THREADS`` when it is set (the usual way to
    share a machine, e.g. among test workers or other jobs), else the cores it may run on (its
    CPU affinity, which a container or ``taskset`` can restrict below ``os.cpu_count()``)."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
