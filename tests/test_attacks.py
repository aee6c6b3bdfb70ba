"""Simulated attacks (fedoap.federation.attacks) and the server's update checks against them."""

from __future__ import annotations

import pytest
import torch

from fedoap.api import run_experiment
from fedoap.basetypes import Update
from fedoap.config import ConfigError
from fedoap.data.dataset import ClientData, Split
from fedoap.federation.attacks import SCALE, invert_training_masks, poison_update
from fedoap.federation.state import load_run_state
from fedoap.runs import RunDir
from tests.conftest import tiny_config

G = {"shared.a": torch.tensor([1.0, 2.0]), "shared.b": torch.tensor([[0.5]])}
U = Update({"shared.a": torch.tensor([1.5, 1.0]), "shared.b": torch.tensor([[0.0]])}, 7)


def test_model_poisoning_is_the_closed_form():
    scaled = poison_update(U, G, "scale", 0, 1, "x").arrays
    assert torch.allclose(scaled["shared.a"], torch.tensor([1 + SCALE * 0.5, 2 - SCALE * 1.0]))
    flipped = poison_update(U, G, "sign_flip", 0, 1, "x").arrays
    assert torch.allclose(flipped["shared.a"], torch.tensor([0.5, 3.0]))
    assert torch.allclose(flipped["shared.b"], torch.tensor([[1.0]]))
    assert all(torch.isnan(v).all() for v in poison_update(U, G, "nan", 0, 1, "x").arrays.values())
    noisy = poison_update(U, G, "noise", 0, 1, "x").arrays
    d = torch.cat([(noisy[k] - G[k]).flatten() for k in G])
    honest = torch.cat([(U.arrays[k] - G[k]).flatten() for k in G])
    assert torch.isclose(d.norm(), honest.norm(), rtol=1e-5) and not torch.allclose(d, honest)
    assert poison_update(U, G, "scale", 0, 1, "x").num_examples == 7


def test_inverted_masks_only_in_training():
    split = Split(
        torch.zeros(2, 1, 2, 2),
        torch.tensor([0.0, 1.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2),
        None,
        None,
    )  # type: ignore[arg-type]
    data = ClientData("x", split, split, split)
    bad = invert_training_masks(data)
    assert torch.equal(bad.train.y, 1 - split.y) and bad.val is split and bad.test is split


def shared(run_dir) -> dict[str, torch.Tensor]:
    """The run's final global shared weights, read through the run-state module."""
    arrays = load_run_state(RunDir(run_dir)).global_arrays
    return {k: v for k, v in arrays.items() if k.startswith("shared.")}


def run(tmp_path, name: str, *over: str) -> dict:
    cfg = tiny_config("method=fedavg", "train.precision=fp32", "finetune.epochs=0", *over)
    return run_experiment(cfg, tmp_path / name, progress=False)


def test_refused_attackers_leave_the_honest_sites_as_if_they_sent_nothing(tmp_path):
    # The scaled upload is refused by its norm, the NaN one as not finite; either way the round
    # averages the two honest sites only, so both runs end with the same global model.
    scaled = run(
        tmp_path, "scale", "federation.attack.clients=[ct]", "federation.attack.kind=scale"
    )
    nan = run(tmp_path, "nan", "federation.attack.clients=[ct]", "federation.attack.kind=nan")
    for summary, why in ((scaled, "update norm"), (nan, "not finite")):
        refused = summary["refused"]
        assert [(r["round"], r["client"]) for r in refused] == [(1, "ct"), (2, "ct")]
        assert all(why in r["reason"] for r in refused)
    a, b = shared(tmp_path / "scale"), shared(tmp_path / "nan")
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for c in ("mri", "us"):
        assert scaled["clients"][c]["test"] == nan["clients"][c]["test"]


def test_without_the_norm_check_a_scaled_upload_reaches_the_mean_but_not_the_median(tmp_path):
    # Distance of the final global model from the same rule's clean run. On a 2-core CPU: 488 for
    # the mean (the attack took it over) and 0.62 for the median of three.
    over = ("federation.attack.clients=[ct]", "federation.max_update_norm_ratio=null")
    mean = run(tmp_path, "mean", *over)
    assert not mean.get("refused")
    run(tmp_path, "median", *over, "federation.aggregator=median")
    run(tmp_path, "clean")
    run(tmp_path, "clean_median", "federation.aggregator=median")

    def dist(a: str, b: str) -> float:
        x, y = shared(tmp_path / a), shared(tmp_path / b)
        return sum(float((x[k] - y[k]).square().sum()) for k in x) ** 0.5

    assert dist("mean", "clean") > 100 * dist("median", "clean_median")


def test_an_attack_on_an_unknown_site_is_a_config_error():
    with pytest.raises(ConfigError, match=r"federation.attack.clients\[0\]: 'xx' is not a client"):
        tiny_config("federation.attack.clients=[xx]")
    with pytest.raises(ConfigError, match="federation.attack.kind: no federation.attack.clients"):
        tiny_config("federation.attack.kind=nan")


def test_refusals_are_in_metrics_csv_and_no_defence_lets_the_attack_in(tmp_path):
    import csv

    run(tmp_path, "nan", "federation.attack.clients=[ct]", "federation.attack.kind=nan")
    rows = list(csv.DictReader((tmp_path / "nan" / "metrics.csv").open()))
    fed = [r for r in rows if r["stage"] == "federated"]
    assert {r["round"] for r in fed} == {"1", "2"}
    for r in fed:  # the attacker's rows carry the server's reason, the honest rows nothing
        assert ("not finite" in r["refused"]) == (r["client"] == "ct"), r
    # Without the checks the NaN upload reaches the mean, and the run stops, saying why.
    with pytest.raises(Exception, match="validate_updates=false let every upload in"):
        run(
            tmp_path,
            "open",
            "federation.attack.clients=[ct]",
            "federation.attack.kind=nan",
            "federation.validate_updates=false",
        )
    with pytest.raises(ConfigError, match="federation.max_update_norm_ratio: not used"):
        tiny_config("federation.validate_updates=false", "federation.max_update_norm_ratio=5")
