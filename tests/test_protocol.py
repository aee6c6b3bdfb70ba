"""What a server accepts from a site (fedoap.federation.protocol): every way an upload can be
malformed is refused, with a reason, and a refused reply never reaches the aggregate."""

from __future__ import annotations

import math

import pytest
import torch

from fedoap.algorithms import build_algorithm
from fedoap.basetypes import Update
from fedoap.errors import FederationError
from fedoap.federation.boundary import run_fit
from fedoap.federation.protocol import check_upload
from fedoap.federation.server import Server
from fedoap.federation.site import Reply
from fedoap.runs import RunDir
from fedoap.training.device import Timer
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
    update, _ = run_fit(
        alg,
        model,
        alg.init_global(model),
        alg.init_client(model),
        data,
        FitContext(data.name, 1, 0),
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


class Scripted:
    """An untrusted transport (as Flower is) whose sites reply as scripted: per site, an upload
    ``(arrays, num_examples, train_loss)`` or ``"lost"`` (no reply)."""

    runtime = "flower"
    trusted = False

    def __init__(self, script):
        self.script = script

    def exchange(self, steps, global_arrays, ft_extra):
        replies, lost = {}, {}
        for name, step in steps.items():
            spec = self.script.get(name) if step.fit else None
            if spec == "lost":
                lost[name] = "killed"
            elif spec is None:
                replies[name] = Reply()
            else:
                arrays, n, loss = spec
                replies[name] = Reply(update=Update(arrays, n, {"train_loss": loss}))
        return replies, lost

    def site_states(self):
        return {}

    def restore_sites(self, rs):
        pass

    def finetune_payload(self, global_arrays, active):
        return {}

    def history(self):
        return {}

    def restore_history(self, history):
        pass

    def describe(self):
        return {}


def _server(fedoap_bank, tmp_path, script, *overrides):
    cfg, alg, model = fedoap_bank
    if overrides:
        cfg = tiny_config("model.kv.mode=bank", *overrides)
    names = [c.name for c in cfg.data.clients]
    server = Server(
        cfg,
        alg,
        Scripted(dict(zip(names, script, strict=True))),
        RunDir(tmp_path),
        names,
        dict(zip(names, [10, 20, 30], strict=True)),
        model,
        Timer(torch.device("cpu")),
    )
    server.global_arrays = good_upload(server.template, 0.0)
    return server, names


def test_the_server_refuses_bad_replies_and_aggregates_the_rest(fedoap_bank, tmp_path):
    """The one server of both runtimes: on an untrusted transport (Flower), a refused upload is
    recorded and never aggregated; in-process the same upload is a bug that stops the run."""
    template = fedoap_bank[1].upload_template(fedoap_bank[2])
    poisoned = good_upload(template, 1e6)
    key = next(k for k in template if k.startswith("shared."))
    poisoned[key] = poisoned[key].fill_(math.nan)
    script = [
        (good_upload(template, 1.0), 10, 0.5),
        (poisoned, 20, 0.4),  # NaN
        (good_upload(template, 1e6), 30_000, 0.3),  # claims 1000x its weight
    ]
    server, names = _server(fedoap_bank, tmp_path, script)
    server._federated_step(1)
    # Only site 0 was aggregated: every shared weight is its 1.0, nothing of the other two.
    for k in template:
        if k.startswith("shared.") and template[k][1].is_floating_point:
            assert torch.equal(server.global_arrays[k], torch.ones_like(server.global_arrays[k]))
    assert server.losses == {names[0]: 0.5}
    assert [(r["client"], r["round"]) for r in server.refused] == [(names[1], 1), (names[2], 1)]
    assert "not finite" in server.refused[0]["reason"]
    assert "30 training images" in server.refused[1]["reason"]
    # Nothing acceptable: the global model stays as it was.
    server, _ = _server(fedoap_bank, tmp_path, [script[1], script[2], script[1]])
    before = {k: v.clone() for k, v in server.global_arrays.items()}
    server._federated_step(1)
    assert all(torch.equal(server.global_arrays[k], before[k]) for k in before)
    # In-process (trusted) the same upload is a bug in fedoap, not a bad site.
    server, _ = _server(fedoap_bank, tmp_path, script)
    server.transport.trusted = True
    with pytest.raises(FederationError, match="bug in the method"):
        server._federated_step(1)


def test_a_lost_site_is_recorded_and_min_fit_fraction_decides_the_round(fedoap_bank, tmp_path):
    template = fedoap_bank[1].upload_template(fedoap_bank[2])
    script = [(good_upload(template, 1.0), 10, 0.5), "lost", (good_upload(template, 1.0), 30, 0.5)]
    server, names = _server(fedoap_bank, tmp_path, script, "federation.min_fit_fraction=0.6")
    server._federated_step(1)  # 2 of 3 replied: enough
    assert [(x["round"], x["client"]) for x in server.lost] == [(1, names[1])]
    assert set(server.losses) == {names[0], names[2]}
    server, _ = _server(fedoap_bank, tmp_path, ["lost", "lost", script[0]])
    with pytest.raises(FederationError, match=r"1 of 3 sampled site\(s\) replied"):
        server._federated_step(1)  # default min_fit_fraction=1.0: every sampled site


def test_outlying_update_and_summary_norms_are_refused_the_rest_aggregated(fedoap_bank, tmp_path):
    """``federation.max_update_norm_ratio``: an update (upload - global) or a K/V summary with
    more than 10x the round's median norm is refused as a value judgement, on either transport;
    the others are aggregated."""
    template = fedoap_bank[1].upload_template(fedoap_bank[2])

    def upload(shared: float, summary: float) -> dict:
        arrays = good_upload(template, shared)
        for k in arrays:
            if k.startswith("kv."):
                arrays[k] = torch.full_like(arrays[k], summary)
        return arrays

    for bad, why in ((upload(100.0, 0.5), "update norm"), (upload(1.0, 1e4), "K/V summary norm")):
        script = [(upload(1.0, 0.5), 10, 0.5), (upload(1.2, 0.6), 20, 0.5), (bad, 30, 0.5)]
        server, names = _server(fedoap_bank, tmp_path, script)
        server.transport.trusted = True  # in-process too: not a bug, a judgement on values
        server._federated_step(1)
        assert [(r["round"], r["client"]) for r in server.refused] == [(1, names[2])]
        assert why in server.refused[0]["reason"] and "10 x" not in server.refused[0]["reason"]
        assert set(server.losses) == set(names[:2])
        key = next(
            k for k in template if k.startswith("shared.") and template[k][1].is_floating_point
        )
        # The example-weighted mean of the two accepted uploads: (10 * 1.0 + 20 * 1.2) / 30.
        assert torch.allclose(
            server.global_arrays[key], torch.full_like(server.global_arrays[key], 34 / 30)
        )
        bank = server.global_arrays["kv.bank"]
        assert bank.shape[0] == 2 * template["kv.summary"][0][0]  # two sites' prototypes
