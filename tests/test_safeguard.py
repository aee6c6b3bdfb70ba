"""The safeguard (safeguard.mode): each site's local-only model, the choice, and its records."""

from __future__ import annotations

import pytest
import torch

import fedoap.federation.site as site_mod
from fedoap.api import resume_experiment, run_experiment
from fedoap.config import ConfigError
from fedoap.federation.checkpoint import load_tensors
from fedoap.federation.safeguard import blend
from fedoap.federation.state import load_selected
from fedoap.models.partition import sub
from fedoap.runs import RunDir, read_metrics
from tests.conftest import results_of, tiny_config

ARGS = ("train.num_threads=1", "train.precision=fp32")


def quiet(cfg, path):
    return run_experiment(cfg, path, progress=False)


@pytest.fixture(scope="module")
def local_and_guarded(tmp_path_factory):
    root = tmp_path_factory.mktemp("sg")
    local = quiet(tiny_config(*ARGS, "method=local"), root / "local")
    guarded = quiet(
        tiny_config(*ARGS, "method=fedavg_ft", "safeguard.mode=choose"), root / "guarded"
    )
    return root, local, guarded


def test_the_local_model_is_locals_bit_for_bit(local_and_guarded):
    """fedavg_ft's network is local's: the safeguard's local-only model is the model `local`
    selects, weight for weight, and where a site keeps it, its test scores are local's."""
    root, local, guarded = local_and_guarded
    state = load_tensors(root / "guarded" / "checkpoints" / "last.safetensors")[0]
    for name, entry in guarded["clients"].items():
        kept = sub(state, f"client/{name}/local/best/")
        weights, _ = load_selected(RunDir(root / "local"), name, local["config_digest"])
        assert kept.keys() == weights.keys()
        for k in kept:
            torch.testing.assert_close(kept[k], weights[k], rtol=0, atol=0)
        sg = entry["safeguard"]
        assert sg["local_best_round"] == local["clients"][name]["best_round"]
        assert sg["val"]["local"] == next(iter(local["clients"][name]["val"].values()))
        # choose: the higher validation score wins, a tie keeps the federated model
        fed, loc = sg["val"]["federated"], sg["val"]["local"]
        assert sg["choice"] == ("local" if loc > fed else "federated")
        assert sg["val"]["chosen"] == max(fed, loc)
        if sg["choice"] == "local":
            assert entry["test"] == local["clients"][name]["test"]
    kept = [e["safeguard"]["choice"] for e in guarded["clients"].values()]
    assert guarded["safeguard"]["kept"] == {
        c: kept.count(c) for c in ("federated", "local", "interpolated")
    }
    # Its cost: summed over the sites from what they reported, the in-process timer's phase.
    assert guarded["time"]["safeguard_seconds"] > 0
    assert guarded["time"]["phases"]["safeguard"] == pytest.approx(
        guarded["time"]["safeguard_seconds"], abs=2e-3
    )
    # Its rows are in metrics.csv under their own stage, one per step and site.
    rows = read_metrics(root / "guarded" / "metrics.csv")
    steps = 2 + 1  # local's rounds, then its fine-tuning epoch
    assert sum(r["stage"] == "safeguard" for r in rows) == 3 * steps


def test_the_saved_model_is_the_one_the_test_scored(local_and_guarded):
    root, local, guarded = local_and_guarded
    for name, entry in guarded["clients"].items():
        weights, _ = load_selected(RunDir(root / "guarded"), name, guarded["config_digest"])
        source = "local" if entry["safeguard"]["choice"] == "local" else "guarded"
        if source == "local":
            expected, _ = load_selected(RunDir(root / "local"), name, local["config_digest"])
            for k in weights:
                torch.testing.assert_close(weights[k], expected[k], rtol=0, atol=0)


def test_interpolate_scores_every_alpha_and_keeps_the_best(tmp_path):
    # FedOAP with an option of its own: the local-only model is FedOAP's network, gate included.
    s = quiet(
        tiny_config(*ARGS, "safeguard.mode=interpolate", "algorithm.gate=true"), tmp_path / "r"
    )
    for entry in s["clients"].values():
        sg = entry["safeguard"]
        scores = {float(a): v for a, v in sg["scores"].items()}
        assert sorted(scores) == [0.0, 0.25, 0.5, 0.75, 1.0]
        # The end points are the two models themselves, scored again: the same numbers.
        assert scores[0.0] == sg["val"]["federated"] and scores[1.0] == sg["val"]["local"]
        best = max(scores.values())
        assert sg["alpha"] == min(a for a, v in scores.items() if v == best)
        assert sg["val"]["chosen"] == best
        assert sg["choice"] == {0.0: "federated", 1.0: "local"}.get(sg["alpha"], "interpolated")


def test_blend_is_exact_at_the_ends_and_linear_between():
    fed = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    loc = {"w": torch.tensor([3.0, -2.0]), "n": torch.tensor(5)}
    assert blend(fed, loc, 0.0) is not fed and blend(fed, loc, 0.0)["w"] is fed["w"]
    assert blend(fed, loc, 1.0)["w"] is loc["w"]
    mid = blend(fed, loc, 0.25)
    torch.testing.assert_close(mid["w"], torch.tensor([1.5, 1.0]))
    assert int(mid["n"]) == 3  # integer buffers: the federated model's


def test_a_run_killed_in_the_safeguard_stage_resumes_to_the_same_result(tmp_path, monkeypatch):
    cfg = tiny_config(*ARGS, "safeguard.mode=interpolate")
    reference = quiet(cfg, tmp_path / "reference")
    calls = {"n": 0}
    real = site_mod.Site._safeguard_step

    def crash_on_the_fifth(self, step):
        calls["n"] += 1
        if calls["n"] == 5:  # the second step, at its second site
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(site_mod.Site, "_safeguard_step", crash_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        quiet(cfg, tmp_path / "killed")
    monkeypatch.setattr(site_mod.Site, "_safeguard_step", real)
    resumed = resume_experiment(tmp_path / "killed", progress=False)
    assert results_of(resumed) == results_of(reference)
    assert (tmp_path / "killed" / "test_cases.csv").read_text() == (
        tmp_path / "reference" / "test_cases.csv"
    ).read_text()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("method=local", "safeguard.mode=choose"), "method local is the local model already"),
        (
            ("safeguard.mode=choose", "privacy.dp.enabled=true", "privacy.dp.epsilon=8"),
            "not supported with privacy.dp",
        ),
        (
            ("safeguard.mode=interpolate", "model.kv.mode=bank"),
            "use safeguard.mode=choose",
        ),
        (("safeguard.mode=interpolate", "safeguard.alphas=[0, 0.5]"), "must hold 0"),
        (("safeguard.mode=choose", "safeguard.alphas=[0, 1]"), "only used by"),
        (("safeguard.mode=interpolate", "safeguard.alphas=[0, 1.5, 1]"), "<= 1"),
    ],
)
def test_settings_it_cannot_serve_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(*overrides)
