"""What a server accepts from a site (fedoap.federation.protocol): every way an upload can be
malformed is refused, with a reason, and a refused reply never reaches the aggregate."""

from __future__ import annotations

import math

import pytest
import torch

from fedoap.algorithms import build_algorithm
from fedoap.federation.protocol import check_upload
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def fedoap_bank():
    cfg = tiny_config("model.kv.mode=bank")
    alg = build_algorithm(cfg)
    model = alg.build_model()
    return cfg, alg, model


def good_upload(template, fill=0.5):
    return {k: torch.full(shape, fill, dtype=dtype) for k, (shape, dtype) in template.items()}


def test_the_template_is_what_a_real_fit_uploads(fedoap_bank):
    """Template and upload agree for FedOAP with its K/V bank summary (the one method that adds
    a key); the runner checks every method's upload against its template on every round."""
    from fedoap.algorithms import FitContext
    from fedoap.data import prepare_clients

    cfg, alg, model = fedoap_bank
    data = prepare_clients(cfg.data)[0]
    update, _ = alg.run_fit(
        model, alg.init_global(model), alg.init_client(model), data, FitContext(data.name, 1, 0)
    )
    template = alg.upload_template(model)
    assert any(k.startswith("kv.") for k in template)
    assert check_upload(update.arrays, update.num_examples, template, len(data.train)) is None


def test_every_malformed_upload_is_refused_with_its_reason(fedoap_bank):
    _, alg, model = fedoap_bank
    template = alg.upload_template(model)
    key = next(iter(template))
    ok = good_upload(template)
    assert check_upload(ok, 10, template, 10) is None
    cases = {
        "missing": ({k: v for k, v in ok.items() if k != key}, 10, "missing " + key),
        "extra": ({**ok, "shared.intruder": torch.zeros(2)}, 10, "unexpected shared.intruder"),
        "shape": ({**ok, key: torch.zeros(3, 1)}, 10, "has shape (3, 1)"),
        "dtype": ({**ok, key: ok[key].double()}, 10, "dtype torch.float64"),
        "nan": ({**ok, key: ok[key].clone().fill_(math.nan)}, 10, "not finite"),
        "inf": ({**ok, key: ok[key].clone().fill_(math.inf)}, 10, "not finite"),
        "zero examples": (ok, 0, "positive integer"),
        "float examples": (ok, 10.0, "positive integer"),
        "inflated examples": (ok, 10_000, "not the 10 training images"),
    }
    for case, (arrays, n, expected) in cases.items():
        reason = check_upload(arrays, n, template, 10)
        assert reason is not None and expected in reason, (case, reason)


def test_a_flower_server_refuses_bad_replies_and_aggregates_the_rest(fedoap_bank, tmp_path):
    pytest.importorskip("flwr")
    from fedoap.federation.flower import FedoapStrategy, ServerLog

    cfg, alg, model = fedoap_bank
    template = alg.upload_template(model)
    names = [c.name for c in cfg.data.clients]
    log = ServerLog(names)
    strategy = FedoapStrategy(
        alg, cfg, {i: i for i in range(3)}, log, tmp_path, template, {0: 10, 1: 20, 2: 30}
    )
    strategy.global_arrays = {k: v for k, v in good_upload(template, 0.0).items()}
    poisoned = good_upload(template, 1e6)
    key = next(k for k in template if k.startswith("shared."))
    poisoned[key] = poisoned[key].fill_(math.nan)
    received = [
        (0, good_upload(template, 1.0), 10, 0.5),
        (1, poisoned, 20, 0.4),  # NaN
        (2, good_upload(template, 1e6), 30_000, 0.3),  # claims 1000x its weight
    ]
    new, loss = strategy.aggregate_checked(1, received)
    # Only site 0 was aggregated: every shared weight is its 1.0, nothing of the other two.
    for k in template:
        if k.startswith("shared.") and template[k][1].is_floating_point:
            assert torch.equal(new[k], torch.ones_like(new[k])), k
    assert loss == 0.5
    assert [(r["client"], r["round"]) for r in log.refused] == [(names[1], 1), (names[2], 1)]
    assert "not finite" in log.refused[0]["reason"]
    assert "30 training images" in log.refused[1]["reason"]
    # Nothing acceptable: the global model stays as it was.
    before = {k: v.clone() for k, v in strategy.global_arrays.items()}
    new, loss = strategy.aggregate_checked(2, received[1:])
    assert math.isnan(loss) and all(torch.equal(new[k], before[k]) for k in before)
