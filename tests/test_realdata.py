"""A short smoke run on the real datasets of ../shared/data (few images, one round)."""

from __future__ import annotations

from fedoap.api import run_experiment
from fedoap.config import load_config
from tests.conftest import REPO


def test_federation4_smoke(shared_data, tmp_path):
    cfg = load_config(
        REPO / "configs" / "federation4.yaml",
        [
            f"data.root={shared_data}",
            "data.image_size=64",
            "data.max_train_images=24",
            "data.max_val_images=16",
            "data.max_test_images=16",
            "model.width=4",
            "federation.rounds=1",
            "finetune.epochs=1",
        ],
    )
    summary = run_experiment(cfg, tmp_path / "run", progress=False)
    assert set(summary["clients"]) == {"brain_mri", "breast_us", "colon_kvasir", "colon_cvc"}
    for c in summary["clients"].values():
        assert c["n"]["train"] == 24 and c["n"]["test"] > 0
        assert 0 <= c["test"]["dice"] <= 1
    # Image-level clients are capped exactly; patient/video clients keep whole cases.
    assert summary["clients"]["breast_us"]["n"]["test"] == 16
    assert summary["clients"]["colon_kvasir"]["n"]["test"] == 16
