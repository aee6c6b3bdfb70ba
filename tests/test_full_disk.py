"""A disk that fills up, or a file-size limit, while a checkpoint is written: one ``error:`` line
(exit 2) naming the checkpoint, never safetensors' traceback; and the run resumes once there is
room again."""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_config
from tests.test_outputs import assert_one_error_line

FEDOAP = [sys.executable, "-m", "fedoap.cli.main"]


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    cfg = tiny_config(
        "federation.rounds=1", "finetune.epochs=0", "data.cache=false", "train.precision=fp32"
    )
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    return path


def in_small_filesystem(mount: Path, size: str, *argv: str | Path) -> subprocess.CompletedProcess:
    """Run ``argv`` with a tmpfs of ``size`` mounted at ``mount`` (user and mount namespaces:
    no privileges needed where the kernel allows them)."""
    script = f'mount -t tmpfs -o size={size} tmpfs "$0" && exec "$@"'
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, str(mount), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_full_disk_during_a_checkpoint_is_one_error_line(tmp_path, cfg_file):
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("unshare") is None or in_small_filesystem(mount, "64k", "true").returncode:
        pytest.skip("needs unprivileged user and mount namespaces (unshare -rm) for a small disk")
    # 128 KiB holds the config, splits and metrics; the first checkpoint (200 KB and more) fills it
    res = in_small_filesystem(
        mount, "128k", *FEDOAP, "run", "-q", "-c", cfg_file, "-o", mount / "run"
    )
    line = assert_one_error_line(res, "No space left on device", str(mount / "run/checkpoints"))
    assert line.startswith("error: [Errno 28] cannot write ")


def test_a_file_size_limit_during_a_checkpoint_is_one_error_line_and_the_run_resumes(
    tmp_path, cfg_file
):
    def limit_files() -> None:  # in the child: writes past 100 KB fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    run = tmp_path / "run"
    res = subprocess.run(
        [*FEDOAP, "run", "-q", "-c", cfg_file, "-o", run],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_files,
    )
    line = assert_one_error_line(res, "File too large", str(run / "checkpoints"))
    assert line.startswith("error: [Errno 27] cannot write ")
    assert not list(run.rglob("*.tmp")), "the failed write's temporary file is removed"
    res = subprocess.run(
        [*FEDOAP, "run", "-q", "--resume", run], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert (run / "summary.json").is_file()
