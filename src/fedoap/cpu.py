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


def cpu_model(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> str:
    """The processor's model name (Linux's ``/proc/cpuinfo``, else :func:`platform.processor`),
    or ``"unknown CPU"``. CPU runs record it: the same code, seed and thread count give the same
    bits on one processor, and numbers that differ in the last digits on another (its vector
    kernels differ), so a CPU result names the processor it came from."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    import platform

    return platform.processor().strip() or "unknown CPU"
