"""Shared fixtures: tiny configs that train in seconds, and the path of the real data."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fedoap.config import Config, apply_overrides, from_dict, validate
from fedoap.cpu import cpu_budget

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEDOAP_SHARED_DATA", REPO.parent / "shared" / "data"))

TINY: dict[str, Any] = {
    "method": "fedoap",
    "seed": 0,
    "data": {
        "image_size": 32,
        "clients": [
            {"name": "mri", "source": "synthetic", "style": "mri", "num_images": 36},
            {"name": "us", "source": "synthetic", "style": "ultrasound", "num_images": 30},
            {"name": "ct", "source": "synthetic", "style": "ct", "num_images": 30},
        ],
    },
    "model": {"width": 4, "depth": 3, "heads": 2},
    "train": {"batch_size": 8, "local_epochs": 1, "lr": 0.003},
    "federation": {"rounds": 2},
    "finetune": {"epochs": 1},
}


def tiny_config(*overrides: str, **sections: Any) -> Config:
    """A three-client synthetic config at 32x32 that runs a round in about a second."""
    data = apply_overrides(TINY, list(overrides))
    for k, v in sections.items():
        data[k] = v
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


#: Set (to anything but 0) where the real data must be present, as CI does: its absence then
#: fails the tests that read it instead of skipping them.
REQUIRE_SHARED_DATA = os.environ.get("FEDOAP_REQUIRE_SHARED_DATA", "0") not in ("", "0")


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (or $FEDOAP_SHARED_DATA). Tests that need it skip, naming the path, where
    it is absent; under FEDOAP_REQUIRE_SHARED_DATA=1 (CI) they fail instead."""
    if not (SHARED_DATA / "lgg_brain_mri.npz").is_file():
        why = (
            f"real data not found at {SHARED_DATA}: put the datasets in ../shared/data beside the "
            "repo, or point FEDOAP_SHARED_DATA at them"
        )
        if REQUIRE_SHARED_DATA:
            pytest.fail(why + " (FEDOAP_REQUIRE_SHARED_DATA is set)")
        pytest.skip(why)
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def isolated_data_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point the data cache (fedoap.data.cache) at a session temp folder: the suite never writes
    into ~/.cache or a user's $FEDOAP_CACHE_DIR, and subprocesses inherit the setting."""
    path = tmp_path_factory.mktemp("fedoap-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDOAP_CACHE_DIR", str(path))
        yield path


@pytest.fixture(autouse=True, scope="session")
def threads_per_worker() -> Iterator[int]:
    """Under pytest-xdist, share the cores among the workers: each worker's torch, and the
    processes its tests start (through ``OMP_NUM_THREADS``), get ``cores / workers`` threads.

    Two workers each running torch's default of one thread per core oversubscribe the machine,
    and torch's threads spin-wait on each other. The LGG nnU-Net test, beside two single-thread
    bench runs on a 2-core CPU, took 127 s (120 CPU-seconds) with two threads and 53 s (32
    CPU-seconds) with one. Without xdist nothing changes. Restored when the session ends."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    old = torch.get_num_threads()
    if workers <= 1:
        yield old
        return
    n = max(1, cpu_budget() // workers)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", str(n))
        torch.set_num_threads(n)
        try:
            yield n
        finally:
            torch.set_num_threads(old)


def results_of(summary: dict) -> dict:
    """``summary`` without what a repeat of the same run may change: its timings and its peak
    device memory (CUDA's allocator can peak differently; seen on an H200)."""
    out = {k: v for k, v in summary.items() if k != "time"}
    if "execution" in out:
        out["execution"] = {k: v for k, v in out["execution"].items() if k != "peak_memory_gib"}
    return out
