"""Robust aggregation (fedoap.aggregation) against closed forms, and aggregate() refusing
input that would poison the global model when it is called directly."""

from __future__ import annotations

import pytest
import torch

from fedoap.aggregation import build_aggregation
from fedoap.aggregation.rules import (
    coordinate_median,
    krum,
    krum_scores,
    multi_krum,
    trimmed_mean,
    weighted_mean,
)
from fedoap.algorithms import build_algorithm
from fedoap.basetypes import Update
from fedoap.config import ConfigError
from tests.conftest import tiny_config


def ups(values: list[list[float]], counts: list[int] | None = None) -> list[Update]:
    counts = counts or [1] * len(values)
    return [
        Update({"shared.w": torch.tensor(v, dtype=torch.float32)}, n)
        for v, n in zip(values, counts, strict=True)
    ]


K = ["shared.w"]


def test_weighted_mean_is_the_closed_form():
    out = weighted_mean(ups([[1.0, 2.0], [4.0, 8.0]], [1, 3]), K)["shared.w"]
    assert torch.allclose(out, torch.tensor([(1 + 3 * 4) / 4, (2 + 3 * 8) / 4]))


def test_median_odd_and_even():
    odd = coordinate_median(ups([[1.0, -1.0], [5.0, 0.0], [100.0, 7.0]]), K)["shared.w"]
    assert odd.tolist() == [5.0, 0.0]
    even = coordinate_median(ups([[1.0], [2.0], [3.0], [100.0]]), K)["shared.w"]
    assert even.tolist() == [2.5]  # the mean of the two middle values


def test_trimmed_mean_drops_floor_beta_n_at_each_end():
    four = ups([[1.0], [2.0], [3.0], [100.0]], [1, 1, 1, 50])  # unweighted: counts ignored
    assert trimmed_mean(four, K, 0.25)["shared.w"].tolist() == [2.5]
    five = ups([[1.0], [2.0], [3.0], [4.0], [100.0]])
    assert trimmed_mean(five, K, 0.2)["shared.w"].tolist() == [3.0]
    assert trimmed_mean(five, K, 0.1)["shared.w"].tolist() == [22.0]  # floor(0.5) = 0: the mean


def test_krum_scores_and_choice_by_hand():
    # Squared distances to the n - f - 2 = 2 nearest others (f = 1, n = 5).
    values = [[0.0], [0.1], [-0.1], [0.05], [100.0]]
    scores = krum_scores(ups(values), K, 1)
    want = [0.0025 + 0.01, 0.0025 + 0.01, 0.01 + 0.0225, 0.0025 + 0.0025]
    assert torch.allclose(scores[:4], torch.tensor(want, dtype=torch.float64))
    assert scores[4] > 1e3
    assert krum(ups(values), K, 1)["shared.w"].tolist() == pytest.approx([0.05])
    # multi-Krum: the example-weighted mean of the n - f = 4 best (everything but 100).
    counts = [1, 2, 3, 4, 5]
    got = multi_krum(ups(values, counts), K, 1)["shared.w"]
    assert torch.allclose(got, torch.tensor([(0 + 0.2 - 0.3 + 0.2) / 10]))
    with pytest.raises(ValueError, match="more than 2 f \\+ 2 = 4 uploads, got 4"):
        krum(ups(values[:4]), K, 1)


def test_integers_take_the_maximum_under_every_rule():
    updates = [
        Update({"shared.n": torch.tensor(n), "shared.w": torch.tensor([float(n)])}, 1)
        for n in (3, 9, 4, 5, 6)
    ]
    for rule in (
        weighted_mean(updates, ["shared.n", "shared.w"]),
        coordinate_median(updates, ["shared.n", "shared.w"]),
        trimmed_mean(updates, ["shared.n", "shared.w"], 0.2),
    ):
        assert int(rule["shared.n"]) == 9
    # multi-Krum drops the outlier upload (w = 9) first: the maximum of the uploads it keeps.
    assert int(multi_krum(updates, ["shared.n", "shared.w"], 1)["shared.n"]) == 6


def test_one_scaled_upload_moves_the_mean_but_not_the_robust_rules():
    honest = [[1.0, 2.0], [1.2, 1.8], [0.9, 2.1]]
    attacked = ups([*honest, [1000.0, -1000.0]])
    assert weighted_mean(attacked, K)["shared.w"].abs().max() > 200
    lo, hi = torch.tensor(honest).min(0).values, torch.tensor(honest).max(0).values
    for out in (coordinate_median(attacked, K), trimmed_mean(attacked, K, 0.25)):
        w = out["shared.w"]
        assert bool(((w >= lo) & (w <= hi)).all()), w


# ------------------------------------------------------- aggregate() called directly


def _direct(**changes: object) -> tuple[object, dict, list[Update]]:
    alg = build_algorithm(tiny_config("method=fedavg"))
    glob = alg.init_global(alg.build_model())
    a = {k: v.clone() for k, v in glob.items()}
    b = {k: v.clone() + 0.1 if v.is_floating_point() else v.clone() for k, v in glob.items()}
    return alg, glob, [Update(a, 10), Update(b, 10)]


@pytest.mark.parametrize(
    "poison, match",
    [
        ("nan", "is not finite"),
        ("inf", "is not finite"),
        ("negative count", "num_examples must be a positive integer, got -5"),
        ("nan count", "num_examples must be a positive integer, got nan"),
        ("missing key", "upload 1 lacks"),
        ("broadcastable shape", "has shape"),
    ],
)
def test_aggregate_refuses_what_would_poison_the_global_model(poison, match):
    alg, glob, (a, b) = _direct()
    key = next(k for k, v in glob.items() if v.is_floating_point() and v.numel() > 1)
    if poison == "nan":
        b.arrays[key][0] = float("nan")
    elif poison == "inf":
        b.arrays[key].view(-1)[0] = float("inf")
    elif poison == "negative count":
        b = Update(b.arrays, -5)
    elif poison == "nan count":
        b = Update(b.arrays, float("nan"))  # type: ignore[arg-type]
    elif poison == "missing key":
        del b.arrays[key]
    else:
        b.arrays[key] = b.arrays[key].flatten()[:1]  # would broadcast against the others
    with pytest.raises(ValueError, match=match):
        alg.aggregate(glob, [a, b], {}, build_aggregation(alg.cfg))  # type: ignore[attr-defined]


def test_aggregate_uses_the_configured_rule():
    cfg = tiny_config("method=fedavg", "federation.aggregator=median")
    alg = build_algorithm(cfg)
    glob = alg.init_global(alg.build_model())
    key = next(k for k, v in glob.items() if v.is_floating_point())
    updates = [Update({k: v + d for k, v in glob.items()}, 1) for d in (0.0, 1.0, 100.0)]
    new = alg.aggregate(glob, updates, {}, build_aggregation(cfg))
    assert torch.allclose(new[key], glob[key] + 1.0)


def test_aggregator_options_are_checked_against_the_rule():
    with pytest.raises(ConfigError, match="federation.trim_beta: only used by"):
        tiny_config("federation.trim_beta=0.3")
    with pytest.raises(ConfigError, match="federation.num_byzantine: only used by"):
        tiny_config("federation.aggregator=median", "federation.num_byzantine=2")
    # Three sites: f = 1 needs more than 4 per round (f < n/2 - 1 fails).
    with pytest.raises(ConfigError, match=r"num_byzantine=1: multi_krum needs more than 2 f \+ 2"):
        tiny_config("federation.aggregator=multi_krum")
    tiny_config("federation.aggregator=krum", "federation.num_byzantine=0")
    tiny_config("federation.aggregator=trimmed_mean", "federation.trim_beta=0.4")


def test_a_run_with_the_median_learns(tmp_path):
    from fedoap.api import run_experiment

    cfg = tiny_config(
        "method=fedavg", "federation.aggregator=median", "train.precision=fp32", "finetune.epochs=0"
    )
    summary = run_experiment(cfg, tmp_path / "run", progress=False)
    import csv

    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    loss = {int(r["round"]): float(r["train_loss"]) for r in rows if r["train_loss"]}
    assert loss[2] < loss[1]  # the median of the sites' models still trains
    assert summary["mean"]["test"]["dice"] > 0


def test_the_token_mean_bank_is_combined_by_the_same_rule():
    cfg = tiny_config(
        "model.kv.mode=bank", "model.kv.summary=token_mean", "federation.aggregator=median"
    )
    alg = build_algorithm(cfg)
    model = alg.build_model()
    template = alg.upload_template(model)
    glob = alg.init_global(model)
    ups_ = []
    for fill in (1.0, 2.0, 500.0):
        arrays = {k: torch.full(shape, fill, dtype=dtype) for k, (shape, dtype) in template.items()}
        ups_.append(Update(arrays, 1))
    bank = alg.aggregate(glob, ups_, {}, build_aggregation(cfg))["kv.bank"]
    assert torch.equal(bank, torch.full_like(bank, 2.0))  # the median, not the mean (167.7)


def test_with_four_uploads_the_quarter_trimmed_mean_is_the_median_bit_for_bit():
    # floor(0.25 * 4) = 1 dropped at each end leaves the two middle values, whose mean is the
    # even-count median: the robustness benchmark runs one of the two where all four uploads
    # are accepted. With three (one refused) they differ: nothing is trimmed, the mean remains.
    gen = torch.Generator().manual_seed(0)
    ups = [Update({"shared.w": torch.randn(1000, generator=gen)}, 10 + i) for i in range(4)]
    med = coordinate_median(ups, ["shared.w"])["shared.w"]
    assert torch.equal(trimmed_mean(ups, ["shared.w"], 0.25)["shared.w"], med)
    three = trimmed_mean(ups[:3], ["shared.w"], 0.25)["shared.w"]
    plain = torch.stack([u.arrays["shared.w"] for u in ups[:3]]).double().mean(0).float()
    assert torch.equal(three, plain) and not torch.equal(
        three, coordinate_median(ups[:3], ["shared.w"])["shared.w"]
    )


def test_a_new_rule_is_one_registered_function_and_a_run_uses_it(tmp_path):
    from fedoap.aggregation import RULES
    from fedoap.api import run_experiment

    calls = []

    def first_upload(updates, keys, policy):  # the first site's upload, as it is
        calls.append(len(updates))
        return {k: updates[0].arrays[k].clone() for k in keys}

    RULES.register("first_upload")(first_upload)
    try:
        cfg = tiny_config(
            "method=fedavg", "federation.aggregator=first_upload", "finetune.epochs=0"
        )
        run_experiment(cfg, tmp_path / "run", progress=False)
    finally:
        del RULES._items["first_upload"]
    assert calls == [3] * cfg.federation.rounds  # every round, over the three sites' uploads


def test_an_unknown_rule_is_refused_before_any_work(tmp_path):
    from fedoap.api import run_experiment

    cfg = tiny_config("federation.aggregator=geometric_median")
    with pytest.raises(
        ConfigError, match="federation.aggregator: unknown aggregator 'geometric_me"
    ):
        run_experiment(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
