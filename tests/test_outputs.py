"""Where commands write: output locations are checked before any work, and nothing is clobbered.

``fedoap predict`` keeps inputs' relative paths under ``--out`` (``s1/x.png`` and ``s2/x.png`` no
longer both write ``x_mask.png``), refuses inputs that would share an output and outputs that
exist (unless ``--force``). ``run``, ``predict``, ``adapt``, ``data prepare``, ``bench`` and
``report`` refuse an output location that is a file or cannot be written, with one ``error:``
line, before reading data or training.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from fedoap.api import predict_images, run_experiment
from fedoap.cli.main import app
from fedoap.data import DataError
from fedoap.errors import OutputError
from tests.conftest import tiny_config

cli = CliRunner()


def fedoap(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real command line, in a fresh process: what a user sees, tracebacks included."""
    return subprocess.run(
        [sys.executable, "-m", "fedoap.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def assert_one_error_line(res: subprocess.CompletedProcess[str], *names: str | Path) -> str:
    """Exit code 2 and exactly one ``error:`` line on stderr, naming each of ``names``."""
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert res.returncode == 2, res.stderr
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders)."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-client run (client ``a``), trained in about three seconds."""
    cfg = tiny_config(
        "model.width=2",
        "federation.rounds=1",
        "finetune.epochs=0",
        "train.precision=fp32",
        data={
            "image_size": 32,
            "clients": [{"name": "a", "source": "synthetic", "style": "mri", "num_images": 24}],
        },
    )
    run_dir = tmp_path_factory.mktemp("outputs") / "run"
    run_experiment(cfg, run_dir, progress=False)
    return run_dir


def write_image(path: Path, seed: int = 0, suffix_format: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (40, 48), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=suffix_format)
    return path


# ------------------------------------------------------------------------------ predict names


def test_predict_keeps_relative_paths_of_inputs_in_different_folders(finished_run, tmp_path):
    x1 = write_image(tmp_path / "in" / "s1" / "x.png", 1)
    x2 = write_image(tmp_path / "in" / "s2" / "x.png", 2)
    out = tmp_path / "p"
    args = ["predict", str(finished_run), "--client", "a", str(x1), str(x2), "-o", str(out)]
    res = cli.invoke(app, [*args, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    for sub in ("s1", "s2"):
        for kind in ("mask", "overlay"):
            path = out / sub / f"x_{kind}.png"
            assert path.is_file(), sorted(tree(out))
            assert Image.open(path).size == (48, 40)
    assert sorted(p.name for p in out.iterdir()) == ["s1", "s2"]


def test_predict_outputs_stay_flat_for_one_folder(finished_run, tmp_path):
    a = write_image(tmp_path / "in" / "a.png", 1)
    b = write_image(tmp_path / "in" / "b.png", 2)
    written = predict_images(finished_run, "a", [a, b], tmp_path / "p", "cpu")
    assert written == [
        (tmp_path / "p" / "a_mask.png", tmp_path / "p" / "a_overlay.png"),
        (tmp_path / "p" / "b_mask.png", tmp_path / "p" / "b_overlay.png"),
    ]
    assert sorted(tree(tmp_path / "p")) == [
        "a_mask.png",
        "a_overlay.png",
        "b_mask.png",
        "b_overlay.png",
    ]


def test_predict_refuses_inputs_that_share_an_output(finished_run, tmp_path):
    x = write_image(tmp_path / "in" / "x.png", 1)
    x_jpg = write_image(tmp_path / "in" / "x.jpg", 2, "JPEG")
    out = tmp_path / "p"
    with pytest.raises(OutputError) as info:
        predict_images(finished_run, "a", [x, x_jpg], out, "cpu")
    assert str(x) in str(info.value) and str(x_jpg) in str(info.value)
    # The same file twice, once through "..".
    again = tmp_path / "in" / ".." / "in" / "x.png"
    with pytest.raises(OutputError) as info:
        predict_images(finished_run, "a", [x, again], out, "cpu")
    assert str(x) in str(info.value) and str(again) in str(info.value)
    assert not out.exists()


def test_predict_refuses_existing_outputs_unless_forced(finished_run, tmp_path):
    x1 = write_image(tmp_path / "in" / "s1" / "x.png", 1)
    x2 = write_image(tmp_path / "in" / "s2" / "x.png", 2)
    out = tmp_path / "p"
    old = out / "s1" / "x_mask.png"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"an earlier mask")
    res = fedoap("predict", finished_run, "--client", "a", x1, x2, "-o", out, "--device", "cpu")
    line = assert_one_error_line(res, old)
    assert "--force" in line
    assert tree(out) == {"s1": None, "s1/x_mask.png": b"an earlier mask"}  # nothing written

    args = ["predict", str(finished_run), "--client", "a", str(x1), str(x2), "-o", str(out)]
    res2 = cli.invoke(app, [*args, "--force"])
    assert res2.exit_code == 0, res2.output
    assert Image.open(old).size == (48, 40)  # replaced by the new mask
    assert (out / "s2" / "x_overlay.png").is_file()


def test_predict_never_overwrites_an_input_even_with_force(finished_run, tmp_path):
    x = write_image(tmp_path / "x.png", 1)
    x_mask = write_image(tmp_path / "x_mask.png", 2)
    before = x_mask.read_bytes()
    with pytest.raises(OutputError, match="x_mask.png"):
        predict_images(finished_run, "a", [x, x_mask], tmp_path, "cpu", force=True)
    assert x_mask.read_bytes() == before


def test_predict_reads_every_input_before_writing(finished_run, tmp_path):
    good = write_image(tmp_path / "in" / "s1" / "good.png", 1)
    bad = tmp_path / "in" / "s2" / "bad.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a png")
    out = tmp_path / "p"
    with pytest.raises(DataError, match="bad.png"):
        predict_images(finished_run, "a", [good, bad], out, "cpu")
    assert not out.exists()  # not even the folder of the good image's outputs


def test_predict_holds_one_decoded_image_at_a_time(finished_run, tmp_path):
    import tracemalloc

    def peak(n: int) -> int:
        rng = np.random.default_rng(n)
        images = []
        for k in range(n):
            p = tmp_path / f"in{n}" / f"x{k}.png"
            p.parent.mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (800, 800), dtype=np.uint8)).save(p)
            images.append(p)
        predict_images(finished_run, "a", images[:1], tmp_path / f"warm{n}", "cpu")  # imports
        tracemalloc.start()
        try:
            predict_images(finished_run, "a", images, tmp_path / f"out{n}", "cpu")
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    # One image's own work peaks at about 40 times its pixels (the overlay, letterboxing); forty
    # images held at once would add forty times them.
    one, forty = peak(1), peak(40)
    assert forty < 1.3 * one, (one, forty)


# ------------------------------------------------------------------------------ output folders


def test_check_output_dir_accepts_new_and_existing_folders(tmp_path):
    from fedoap.fileio import check_output_dir

    check_output_dir(tmp_path)
    check_output_dir(tmp_path / "new" / "deeper")


def test_check_output_dir_refuses_a_file(tmp_path):
    from fedoap.fileio import check_output_dir

    f = tmp_path / "f.txt"
    f.write_text("keep")
    with pytest.raises(OutputError, match="--out") as info:
        check_output_dir(f)
    assert str(f) in str(info.value) and "not a folder" in str(info.value)


def test_check_output_dir_refuses_a_file_ancestor(tmp_path):
    from fedoap.fileio import check_output_dir

    f = tmp_path / "f.txt"
    f.write_text("keep")
    with pytest.raises(OutputError, match="-o") as info:
        check_output_dir(f / "sub" / "run", option="-o")
    msg = str(info.value)
    assert str(f / "sub" / "run") in msg and f"{f} is a file" in msg


def test_check_output_dir_refuses_an_unwritable_ancestor(tmp_path, monkeypatch):
    import fedoap.fileio
    from fedoap.fileio import check_output_dir

    calls = []

    def no_access(path, mode):
        calls.append(Path(path))
        return False

    monkeypatch.setattr(fedoap.fileio.os, "access", no_access)
    with pytest.raises(OutputError, match="not writable") as info:
        check_output_dir(tmp_path / "a" / "b")
    assert calls == [tmp_path] and str(tmp_path) in str(info.value)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc on this system")
def test_check_output_dir_refuses_a_location_even_root_cannot_write():
    from fedoap.fileio import check_output_dir

    with pytest.raises(OutputError, match="not writable") as info:
        check_output_dir(Path("/proc/fedoap-test/run"))
    assert "/proc/fedoap-test/run" in str(info.value)


def test_check_output_dir_leaves_nothing_behind(tmp_path):
    from fedoap.fileio import check_output_dir

    check_output_dir(tmp_path / "new")
    check_output_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="running as root: chmod 0555 does not stop root from writing",
)
def test_check_output_dir_refuses_a_read_only_folder(tmp_path):
    from fedoap.fileio import check_output_dir

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="not writable"):
            check_output_dir(ro / "run")
        with pytest.raises(OutputError, match="not writable"):
            check_output_dir(ro)
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------------------ commands


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    cfg = tiny_config("federation.rounds=1", "finetune.epochs=0", "model.width=2")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "taken.txt"
    path.write_text("keep me")
    return path


def test_run_refuses_an_output_that_is_a_file(tmp_path, cfg_file, a_file):
    before = tree(tmp_path)
    res = fedoap("run", "-c", cfg_file, "-o", a_file, "--quiet", cwd=tmp_path)
    assert_one_error_line(res, a_file, "--out")
    assert tree(tmp_path) == before  # the file untouched, no run folder created or moved aside


def test_run_checks_the_output_before_reading_data(tmp_path, a_file):
    data = tiny_config().to_dict()["data"]
    data["clients"] = [{"name": "gone", "source": "npz", "path": str(tmp_path / "missing.npz")}]
    cfg = tiny_config().to_dict() | {"data": data}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    res = cli.invoke(app, ["run", "-c", str(tmp_path / "cfg.yaml"), "-o", str(a_file / "run")])
    assert res.exit_code == 2, res.output
    assert f"{a_file} is a file" in res.output and "missing.npz" not in res.output


def test_predict_refuses_an_output_that_is_a_file(finished_run, tmp_path, a_file):
    x = write_image(tmp_path / "x.png")
    res = fedoap("predict", finished_run, "--client", "a", x, "-o", a_file, "--device", "cpu")
    assert_one_error_line(res, a_file, "--out")
    assert a_file.read_text() == "keep me"


def test_adapt_refuses_an_output_that_is_a_file(finished_run, tmp_path, a_file):
    res = fedoap(
        "adapt",
        finished_run,
        "--data",
        tmp_path / "new.npz",
        "--name",
        "new",
        "-o",
        a_file,
        "--device",
        "cpu",
    )
    assert_one_error_line(res, a_file, "--out")
    assert a_file.read_text() == "keep me"


def test_data_prepare_refuses_an_output_that_is_a_file(tmp_path, cfg_file, a_file):
    res = fedoap("data", "prepare", "-c", cfg_file, "-o", a_file)
    assert_one_error_line(res, a_file, "--out")
    assert a_file.read_text() == "keep me"


def test_data_prepare_checks_the_output_before_reading_data(tmp_path, a_file):
    data = tiny_config().to_dict()["data"]
    data["clients"] = [{"name": "gone", "source": "npz", "path": str(tmp_path / "missing.npz")}]
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tiny_config().to_dict() | {"data": data}))
    out = a_file / "prepared"
    res = cli.invoke(app, ["data", "prepare", "-c", str(tmp_path / "cfg.yaml"), "-o", str(out)])
    assert res.exit_code == 2, res.output
    assert f"{a_file} is a file" in res.output and "missing.npz" not in res.output


def test_bench_refuses_an_output_that_is_a_file(tmp_path, a_file):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tiny_config().to_dict()))
    spec = tmp_path / "b.yaml"
    spec.write_text(yaml.safe_dump({"base": "base.yaml", "methods": ["local"], "seeds": [0]}))
    res = cli.invoke(app, ["bench", "-c", str(spec), "-o", str(a_file)])
    assert res.exit_code == 2, res.output
    assert str(a_file) in res.output and "--out" in res.output
    assert a_file.read_text() == "keep me"


def test_report_refuses_a_results_path_that_is_a_file(a_file):
    res = cli.invoke(app, ["report", str(a_file)])
    assert res.exit_code == 2, res.output
    assert str(a_file) in res.output and "not a folder" in res.output


# ----------------------------------------------------------- planted symbolic links


def plant_links(folder: Path, names: list[str], victim: Path) -> None:
    """A symbolic link to ``victim`` at each of ``names`` in ``folder``: where a predictable
    temporary file or log would be opened."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).symlink_to(victim)


def test_predict_does_not_write_through_a_planted_temporary_link(finished_run, tmp_path):
    x = write_image(tmp_path / "in" / "x.png", 1)
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours")
    out = tmp_path / "p"
    plant_links(out, ["x_mask.png.tmp", "x_overlay.png.tmp"], victim)
    res = fedoap("predict", finished_run, "--client", "a", x, "-o", out, "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert victim.read_text() == "not yours"
    assert Image.open(out / "x_mask.png").size == (48, 40)


def test_predict_force_replaces_a_linked_output_not_its_target(finished_run, tmp_path):
    x = write_image(tmp_path / "in" / "x.png", 1)
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours")
    out = tmp_path / "p"
    plant_links(out, ["x_mask.png"], victim)
    res = fedoap("predict", finished_run, "--client", "a", x, "-o", out, "--device", "cpu")
    assert_one_error_line(res, out / "x_mask.png")  # an existing output, link or not
    res = fedoap("predict", finished_run, "--client", "a", x, "-o", out, "--force")
    assert res.returncode == 0, res.stderr
    assert victim.read_text() == "not yours"
    assert not (out / "x_mask.png").is_symlink()


def test_atomic_writes_never_follow_a_planted_link(tmp_path):
    import torch

    from fedoap.federation.checkpoint import load_tensors, save_tensors
    from fedoap.fileio import atomic_write_text, atomic_writer, open_append

    victim = tmp_path / "victim.txt"
    victim.write_text("not yours")
    plant_links(tmp_path / "o", ["a.txt.tmp", "m.safetensors.tmp", "log.txt"], victim)
    atomic_write_text(tmp_path / "o" / "a.txt", "new")
    save_tensors(tmp_path / "o" / "m.safetensors", {"w": torch.ones(3)}, {"round": 1})
    assert (tmp_path / "o" / "a.txt").read_text() == "new"
    assert load_tensors(tmp_path / "o" / "m.safetensors")[0]["w"].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(OSError):  # a log is appended to only where it is a file of its own
        open_append(tmp_path / "o" / "log.txt")
    assert victim.read_text() == "not yours"
    # what a failed write leaves: the old file and no temporary
    with pytest.raises(ZeroDivisionError), atomic_writer(tmp_path / "o" / "a.txt") as fh:
        fh.write(b"half")
        raise ZeroDivisionError
    assert (tmp_path / "o" / "a.txt").read_text() == "new"
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.startswith(".")]
