"""A site's selected model is bound to its client and its run: a file copied from another site,
another seed or another config is refused with a one-line error naming it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from fedoap.api import load_client_model, run_experiment
from fedoap.errors import CheckpointError
from fedoap.federation.checkpoint import load_tensors, save_tensors
from tests.conftest import tiny_config
from tests.test_outputs import assert_one_error_line, fedoap, write_image


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-client run (``a`` and ``b``), a few seconds."""
    client = {"source": "synthetic", "style": "mri", "num_images": 24}
    cfg = tiny_config(
        "model.width=2",
        "federation.rounds=1",
        "finetune.epochs=0",
        "train.precision=fp32",
        data={"image_size": 32, "clients": [{"name": n, **client} for n in ("a", "b")]},
    )
    run_dir = tmp_path_factory.mktemp("binding") / "run"
    run_experiment(cfg, run_dir, progress=False)
    return run_dir


@pytest.fixture
def run(two_sites: Path, tmp_path: Path) -> Path:
    """A copy of the finished run, to tamper with."""
    return Path(shutil.copytree(two_sites, tmp_path / "run"))


def best(run: Path, client: str) -> Path:
    return run / "checkpoints" / "best" / f"{client}.safetensors"


def test_each_model_records_its_client_and_config(run):
    from fedoap.config import load_config

    _, meta = load_tensors(best(run, "b"))
    assert meta["client"] == "b"
    assert meta["config_digest"] == load_config(run / "config.yaml").digest()
    load_client_model(run, "b", torch.device("cpu"))  # and loads


def test_a_model_copied_from_another_site_is_refused(run, tmp_path):
    shutil.copy(best(run, "a"), best(run, "b"))
    x = write_image(tmp_path / "x.png")
    res = fedoap("predict", run, "--client", "b", x, "-o", tmp_path / "p", "--device", "cpu")
    line = assert_one_error_line(res, best(run, "b"))
    assert "holds the model of client 'a', not of 'b'" in line
    assert not (tmp_path / "p" / "x_mask.png").exists()


def test_a_model_of_another_run_is_refused(run):
    # The run's config now says seed 1: the saved models come from the run of seed 0.
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["seed"] = 1
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    with pytest.raises(CheckpointError, match=r"b\.safetensors: comes from a run of another"):
        load_client_model(run, "b", torch.device("cpu"))


def test_an_old_model_of_another_width_is_a_one_line_error(run, tmp_path):
    # Written before models recorded their config: only the client is checked, and a shape that
    # does not fit is refused by name instead of a RuntimeError traceback.
    tensors, meta = load_tensors(best(run, "a"))
    wider = {k: torch.zeros(*(2 * s for s in v.shape)) for k, v in tensors.items()}
    save_tensors(best(run, "a"), wider, {"client": "a", "best_round": 1, "method": "fedoap"})
    x = write_image(tmp_path / "x.png")
    res = fedoap("predict", run, "--client", "a", x, "-o", tmp_path / "p", "--device", "cpu")
    line = assert_one_error_line(res, best(run, "a"))
    assert "its weights do not fit the model of" in line
