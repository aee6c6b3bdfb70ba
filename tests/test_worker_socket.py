"""The site worker's socket on a Flower deployment stays between this user's processes.

The relay (the ClientApp Flower starts per message) sends the worker the node config, including
the data path, and the global weights, and passes on its answer as the site's. Another local user
must not be able to take the worker's place: neither by making the socket folder first, nor by
listening on the socket's name.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower tests need pip install -e '.[flower]'")

from fedoap.federation import flower_client  # noqa: E402
from fedoap.federation.flower_client import WorkerError, private_folder  # noqa: E402

NOBODY = 65534
as_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root, to act as a second user (nobody)"
)


def test_the_socket_folder_is_created_private(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = flower_client.worker_socket({"data-path": "/data"})
    folder = tmp_path / f"fedoap-workers-{os.getuid()}"
    assert path.parent == folder
    assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700
    assert flower_client.worker_socket({"data-path": "/data"}) == path  # reused as it is


def test_a_socket_folder_others_can_open_is_refused(tmp_path):
    folder = tmp_path / "w"
    folder.mkdir(mode=0o700)
    folder.chmod(0o777)
    with pytest.raises(WorkerError, match=r"w has mode 777; only its owner may open it"):
        private_folder(folder)


def test_a_linked_socket_folder_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "w").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(WorkerError, match=r"w is a symbolic link"):
        private_folder(tmp_path / "w")


@as_root
def test_a_socket_folder_of_another_user_is_refused(tmp_path):
    folder = tmp_path / "w"
    folder.mkdir(mode=0o700)
    os.chown(folder, NOBODY, NOBODY)
    with pytest.raises(WorkerError, match=rf"belongs to uid {NOBODY}, not to this user"):
        private_folder(folder)


@as_root
def test_the_relay_does_not_speak_to_another_users_listener():
    shared = Path(tempfile.mkdtemp(prefix="fedoap-peer-"))
    try:
        shared.chmod(0o777)
        path = shared / "w.sock"
        pid = os.fork()  # the other user's process (a python of /root is out of its reach)
        if pid == 0:  # pragma: no cover - the child
            try:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.bind(str(path))
                s.listen(1)
                s.accept()
                time.sleep(5)
            finally:
                os._exit(0)
        try:
            for _ in range(200):
                if path.exists():
                    break
                time.sleep(0.05)
            assert os.stat(path).st_uid == NOBODY
            with pytest.raises(WorkerError, match=rf"runs as uid {NOBODY}, not as this user"):
                flower_client._connect(path)
        finally:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        # and one of this user's is accepted
        own = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path.unlink()
        own.bind(str(path))
        own.listen(1)
        with own:
            conn = flower_client._connect(path)
            assert conn is not None
            conn.close()
    finally:
        shutil.rmtree(shared)
