"""One process at a time writes a run folder: a second ``fedoap run``, ``--resume``, ``--force``
or ``evaluate`` of a folder in use stops with one line and touches nothing.

The folder is held by a child process that takes the lock with plain ``fcntl.flock`` (as the
kernel sees it, what a running ``fedoap run`` holds), so these tests need nothing of the lock's
own code to set up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fedoap.api import run_experiment
from fedoap.errors import FedoapError
from fedoap.runs import RunDir
from tests.conftest import tiny_config

LOCK = ".fedoap.lock"  # fedoap.runs.LOCK_NAME, spelled out: the holder below is not fedoap's

#: Takes the lock of the file argv[1], writes its pid into it, says so, and sleeps.
HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
time.sleep(600)
"""

#: What a running atomic write of the last checkpoint leaves in the folder (fileio's naming).
LIVE_TMP = "checkpoints/.last.safetensors.0123456789ab.tmp"


@contextlib.contextmanager
def held(folder: Path) -> Iterator[subprocess.Popen[str]]:
    """``folder`` locked by another process for the ``with`` block."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder / LOCK)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def in_use(folder: Path, pid: int) -> str:
    return (
        f"run folder {folder} is in use by another fedoap process (pid {pid}); wait for it to "
        "finish or stop it, or use another folder"
    )


def fedoap(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedoap.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (the lock file aside) and its content."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished one-round run, and the config file it was made from."""
    root = tmp_path_factory.mktemp("lock")
    cfg = tiny_config("federation.rounds=1", "finetune.epochs=0")
    cfg_path = root / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    run_experiment(cfg, root / "run", progress=False)
    return root / "run", cfg_path


def copy_run(src: Path, dst: Path, finished: bool = True) -> Path:
    shutil.copytree(src, dst)
    if not finished:
        (dst / "summary.json").unlink()  # killed before its end: --resume would continue it
    (dst / LIVE_TMP).write_bytes(b"the other process's checkpoint, half written")
    return dst


def test_resume_of_a_run_in_use_fails_in_one_line_and_touches_nothing(finished, tmp_path):
    run = copy_run(finished[0], tmp_path / "run", finished=False)
    before = snapshot(run)
    with held(run) as other:
        res = fedoap("run", "--resume", str(run), "--quiet")
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip() == f"error: {in_use(run, other.pid)}"
    assert snapshot(run) == before  # the live temporary, the checkpoints: all as they were
    assert not (run / "summary.json").exists()


def test_force_does_not_move_a_run_in_use(finished, tmp_path):
    run = copy_run(finished[0], tmp_path / "run")
    before = snapshot(run)
    with held(run) as other:
        res = fedoap("run", "-c", str(finished[1]), "-o", str(run), "--quiet", "--force")
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip() == f"error: {in_use(run, other.pid)}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no run.old-* beside it
    assert snapshot(run) == before


def test_evaluate_of_a_run_in_use_writes_nothing(finished, tmp_path):
    run = copy_run(finished[0], tmp_path / "run")
    with held(run) as other:
        res = fedoap("evaluate", str(run))
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip() == f"error: {in_use(run, other.pid)}"
    assert not (run / "evaluation_test.json").exists()


def test_a_flower_server_app_on_a_run_in_use_is_refused_before_it_reads_anything(
    finished, tmp_path
):
    # A deployment's ServerApp (flwr run ... run-dir=R) holds R itself; only the simulation that
    # a fedoap run launches passes lock-held, as that process holds R for it.
    from types import SimpleNamespace

    from fedoap.federation.flower_server import server_main

    run = copy_run(finished[0], tmp_path / "run", finished=False)
    before = snapshot(run)
    context = SimpleNamespace(run_config={"run-dir": str(run), "resume": "true"})
    with held(run) as other, pytest.raises(FedoapError) as err:
        server_main(None, context)  # type: ignore[arg-type]  # refused before the grid is used
    assert str(err.value) == in_use(run, other.pid)
    assert snapshot(run) == before


def test_a_new_run_in_an_empty_folder_in_use_is_refused(tmp_path):
    """The folder made beforehand (empty) and locked by another process's run that has not
    written yet: preparing it, even with force, is refused and creates nothing."""
    run = tmp_path / "run"
    run.mkdir()
    with held(run) as other:
        for force in (False, True):
            with pytest.raises(FedoapError) as err:
                RunDir(run).prepare(force=force)
            assert str(err.value) == in_use(run, other.pid)
        assert [p.name for p in run.iterdir()] == [LOCK]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_stale_temporaries_are_kept_while_another_process_holds_the_folder(finished, tmp_path):
    run = copy_run(finished[0], tmp_path / "run")
    with held(run):
        RunDir(run).remove_stale_temporaries()
        assert (run / LIVE_TMP).is_file()
    RunDir(run).remove_stale_temporaries()  # the holder is gone: now it is stale
    assert not (run / LIVE_TMP).exists()
    assert not (run / LOCK).exists()


def test_a_killed_holders_lock_file_is_taken_over_and_removed(tmp_path):
    """A holder killed (SIGKILL) leaves its lock file: the folder is not started, the next run
    locks it again, and the file is gone when that run ends."""
    run = tmp_path / "run"
    run.mkdir()
    with held(run):
        pass  # killed
    assert [p.name for p in run.iterdir()] == [LOCK]
    assert not RunDir(run).is_started()
    assert RunDir(run).prepare() is None
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "plots"]


def test_two_threads_creating_one_folder_one_wins(tmp_path, monkeypatch):
    """Both threads are stopped right after checking the folder is empty, the window of a
    check-then-create; threads of one process contend for the lock as processes do."""
    run = RunDir(tmp_path / "run")
    check = RunDir.is_started
    both_checked = threading.Barrier(2)

    def slow_check(self: RunDir) -> bool:
        started = check(self)
        with contextlib.suppress(threading.BrokenBarrierError):
            both_checked.wait(timeout=1)  # the loser never gets here: the winner times out
        return started

    monkeypatch.setattr(RunDir, "is_started", slow_check)
    outcomes: list[str] = []

    def prepare() -> None:
        try:
            run.prepare()
            outcomes.append("created")
        except FedoapError as err:
            outcomes.append(str(err))

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("created") == 1, outcomes
    (lost,) = [o for o in outcomes if o != "created"]
    assert lost == in_use(run.root, os.getpid())
    assert sorted(p.name for p in run.root.iterdir()) == ["checkpoints", "plots"]


def test_a_lock_file_replaced_while_locking_is_locked_again(tmp_path, monkeypatch):
    """Whoever opened the lock file just before its holder released (and removed) it, then
    locks it, holds a file no longer in the folder: it must lock the one there now."""
    import fcntl

    from fedoap import fileio

    path = tmp_path / LOCK
    real_flock = fcntl.flock
    calls = []

    def flock_after_release(fd: int, op: int) -> None:
        if not calls:  # the previous holder releases: its file goes, a new one takes its place
            path.unlink()
            path.write_text("")
        calls.append(fd)
        real_flock(fd, op)

    monkeypatch.setattr(fileio.fcntl, "flock", flock_after_release)
    fd = fileio.acquire_lock(path)
    try:
        assert len(calls) == 2
        assert os.fstat(fd).st_ino == path.stat().st_ino
        assert path.read_text() == f"{os.getpid()}\n"
    finally:
        fileio.release_lock(fd, path)
    assert not path.exists()
