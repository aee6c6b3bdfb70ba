"""The defining invariant of each baseline, checked on the algorithm objects themselves."""

from __future__ import annotations

import math

import pytest
import torch

import fedoap.training.engine as engine
from fedoap.aggregation import build_aggregation
from fedoap.algorithms import ALGORITHMS, FitContext, build_algorithm
from fedoap.api import run_experiment
from fedoap.basetypes import SHARED
from fedoap.data import prepare_clients
from fedoap.models.blocks import NORM_TYPES
from fedoap.models.partition import keys_of_children, keys_of_type, sub
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def clients():
    return prepare_clients(tiny_config().data)


def run_rounds(cfg, clients, rounds=1):
    """Drive an algorithm by hand: returns (algorithm, model, global arrays, client states)."""
    alg = build_algorithm(cfg)
    model = alg.build_model()
    g = alg.init_global(model)
    server: dict = {}
    states = {c.name: alg.init_client(model) for c in clients}
    uploads = {}
    for r in range(1, rounds + 1):
        updates = []
        for c in clients:
            up, states[c.name] = alg.fit(
                model, g, states[c.name], c, FitContext(c.name, r, cfg.seed)
            )
            updates.append(up)
            uploads[c.name] = up
        g = alg.aggregate(g, updates, server, build_aggregation(cfg))
    return alg, model, g, states, uploads


def uploaded_keys(update) -> set[str]:
    return {k[len(SHARED) :] for k in update.arrays if k.startswith(SHARED)}


def test_every_method_is_registered_with_a_cited_docstring():
    import sys

    for name in ALGORITHMS.names():
        cls = ALGORITHMS.get(name)
        doc = sys.modules[cls.__module__].__doc__ or ""
        assert len(doc) > 100, name
    assert {
        "local",
        "centralized",
        "fedavg",
        "fedavg_ft",
        "fedavgm",
        "fedadam",
        "fedadagrad",
        "fedprox",
        "fedbn",
        "fedper",
        "fedrep",
        "lg_fedavg",
        "ditto",
        "feddp",
        "fedoap",
    } <= set(ALGORITHMS.names())


def test_same_backbone_for_every_method():
    """Methods without attention share one network, parameter for parameter."""
    counts = {}
    for name in ALGORITHMS.names():
        alg = build_algorithm(tiny_config(f"method={name}"))
        model = alg.build_model()
        counts[name] = (model.attention_kind, sum(p.numel() for p in model.parameters()))
    plain = {n: c for n, (kind, c) in counts.items() if kind == "none"}
    assert len(set(plain.values())) == 1, plain
    assert counts["feddp"][0] == "self" and counts["fedoap"][0] == "cross"
    assert counts["fedoap"][1] > counts["feddp"][1] > next(iter(plain.values()))


def test_fedprox_with_mu_zero_is_fedavg(clients):
    *_, g_avg, _, _ = run_rounds(tiny_config("method=fedavg"), clients)
    *_, g_prox, _, _ = run_rounds(tiny_config("method=fedprox", "algorithm.mu=0.0"), clients)
    assert g_avg.keys() == g_prox.keys()
    assert all(torch.equal(g_avg[k], g_prox[k]) for k in g_avg)


def test_fedprox_pulls_towards_the_global_model(clients):
    cfg_avg, cfg_prox = (
        tiny_config("method=fedavg"),
        tiny_config("method=fedprox", "algorithm.mu=10.0"),
    )
    _, _, g0, _, up_avg = run_rounds(cfg_avg, clients[:1])
    alg = build_algorithm(cfg_prox)
    start = alg.init_global(alg.build_model())

    def drift(up):
        return sum(
            ((up.arrays[k] - start[k]) ** 2).sum() for k in start if start[k].is_floating_point()
        )

    _, _, _, _, up_prox = run_rounds(cfg_prox, clients[:1])
    name = clients[0].name
    assert drift(up_prox[name]) < drift(up_avg[name])


def test_fedavgm_without_momentum_and_unit_lr_is_fedavg(clients):
    *_, g_avg, _, _ = run_rounds(tiny_config("method=fedavg"), clients, rounds=2)
    *_, g_m, _, _ = run_rounds(
        tiny_config("method=fedavgm", "algorithm.momentum=0.0", "algorithm.server_lr=1.0"),
        clients,
        rounds=2,
    )
    for k in g_avg:
        torch.testing.assert_close(g_m[k], g_avg[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["fedavgm", "fedadam", "fedadagrad", "fedyogi"])
def test_server_optimizers_against_hand_computation(method):
    # Prepare: one scalar parameter, two rounds with known client models.
    alg = build_algorithm(tiny_config(f"method={method}"))
    o = alg.options
    w0 = torch.tensor([1.0])
    server: dict = {}
    from fedoap.basetypes import Update

    g = {"shared.w": w0}
    ws, m, v, mom = [1.0], 0.0, (getattr(o, "tau", 0.0) ** 2), 0.0
    for client_value in (1.5, 1.2):
        # Execute
        up = Update({"shared.w": torch.tensor([client_value])}, 3)
        g = alg.aggregate(g, [up], server, build_aggregation(alg.cfg))
        # Assert: the paper's update, computed by hand
        d = client_value - ws[-1]
        if method == "fedavgm":
            mom = o.momentum * mom + d
            ws.append(ws[-1] + o.server_lr * mom)
        else:
            m = o.beta1 * m + (1 - o.beta1) * d
            if method == "fedadam":
                v = o.beta2 * v + (1 - o.beta2) * d * d
            elif method == "fedadagrad":
                v = v + d * d
            else:
                v = v - (1 - o.beta2) * d * d * math.copysign(1, v - d * d)
            ws.append(ws[-1] + o.server_lr * m / (math.sqrt(v) + o.tau))
        assert g["shared.w"].item() == pytest.approx(ws[-1], rel=1e-6)


def test_fedbn_never_uploads_a_norm_parameter(clients):
    for norm in ("instance", "batch"):
        alg, model, _, _, uploads = run_rounds(
            tiny_config("method=fedbn", f"model.norm={norm}"), clients[:1]
        )
        norm_keys = keys_of_type(model, NORM_TYPES)
        sent = uploaded_keys(next(iter(uploads.values())))
        assert norm_keys and not sent & norm_keys
        assert sent | norm_keys == set(model.state_dict())
        if norm == "batch":
            assert any(k.endswith("running_var") for k in norm_keys)


@pytest.mark.parametrize(
    "method, personal_modules",
    [
        ("fedper", {"head"}),
        ("fedrep", {"head"}),
        ("lg_fedavg", {"encoder", "bottleneck"}),
        ("fedbabu", {"head"}),
    ],
)
def test_personal_layer_methods_upload_exactly_the_shared_layers(clients, method, personal_modules):
    alg, model, _, _, uploads = run_rounds(tiny_config(f"method={method}"), clients[:1])
    personal = keys_of_children(model, personal_modules)
    assert uploaded_keys(next(iter(uploads.values()))) == set(model.state_dict()) - personal


def test_fedrep_trains_head_then_body(clients, monkeypatch):
    cfg = tiny_config("method=fedrep")
    alg = build_algorithm(cfg)
    model = alg.build_model()
    head = keys_of_children(model, ("head",))
    phases = []
    real = engine.train_epochs

    def spy(model, optimizer, *args, **kwargs):
        ids = {id(p) for grp in optimizer.param_groups for p in grp["params"]}
        names = {k for k, p in model.named_parameters() if id(p) in ids}
        phases.append("head" if names <= head else "body" if not names & head else "mixed")
        return real(model, optimizer, *args, **kwargs)

    monkeypatch.setattr("fedoap.training.local.train_epochs", spy)
    run_rounds(cfg, clients[:1])
    assert phases == ["head", "body"]


def test_fedbabu_never_trains_the_head_during_federation(clients):
    cfg = tiny_config("method=fedbabu")
    alg, model, g, states, _ = run_rounds(cfg, clients, rounds=2)
    fresh = build_algorithm(cfg).build_model().state_dict()
    for st in states.values():
        for k, v in st.personal.items():
            assert torch.equal(v, fresh[k])


def test_ditto_with_lambda_zero_gives_the_local_model(clients):
    _, _, _, local_states, _ = run_rounds(tiny_config("method=local"), clients, rounds=2)
    _, _, _, ditto_states, _ = run_rounds(
        tiny_config("method=ditto", "algorithm.lam=0.0"), clients, rounds=2
    )
    for name, st in local_states.items():
        personal = sub(ditto_states[name].extra, "personal/")
        assert personal.keys() == st.personal.keys()
        assert all(torch.equal(personal[k], st.personal[k]) for k in personal), name


def test_ditto_personal_model_moves_towards_the_global_one(clients):
    *_, loose, _ = run_rounds(
        tiny_config("method=ditto", "algorithm.lam=0.0"), clients[:1], rounds=1
    )
    alg, _, g, tight, _ = run_rounds(
        tiny_config("method=ditto", "algorithm.lam=50.0"), clients[:1], rounds=1
    )
    init = build_algorithm(tiny_config("method=ditto")).init_global(alg.build_model())
    name = clients[0].name

    def dist(st):
        p = sub(st[name].extra, "personal/")
        return sum(((p[k] - init[SHARED + k]) ** 2).sum() for k in p if p[k].is_floating_point())

    assert dist(tight) < dist(loose)


def test_apfl_with_alpha_zero_trains_the_fedavg_global_model(clients):
    *_, g_avg, _, _ = run_rounds(tiny_config("method=fedavg"), clients)
    alg, model, g_apfl, states, _ = run_rounds(
        tiny_config("method=apfl", "algorithm.alpha=0.0", "algorithm.alpha_lr=0.0"), clients
    )
    assert all(torch.equal(g_avg[k], g_apfl[k]) for k in g_avg)
    # ... and its personalised model is then the global model itself.
    alg.personalize(model, g_apfl, states[clients[0].name])
    assert all(torch.equal(v, g_apfl[SHARED + k]) for k, v in model.state_dict().items())


def test_apfl_with_alpha_one_trains_the_local_model(clients):
    _, _, _, local, _ = run_rounds(tiny_config("method=local"), clients[:1], rounds=2)
    _, _, _, apfl, _ = run_rounds(
        tiny_config("method=apfl", "algorithm.alpha=1.0", "algorithm.alpha_lr=0.0"),
        clients[:1],
        rounds=2,
    )
    name = clients[0].name
    v = sub(apfl[name].extra, "local/")
    assert all(torch.equal(v[k], local[name].personal[k]) for k in local[name].personal)


def test_apfl_learns_alpha_within_bounds(clients):
    *_, states, uploads = run_rounds(
        tiny_config("method=apfl", "algorithm.alpha_lr=0.5"), clients[:1], rounds=2
    )
    alpha = float(next(iter(states.values())).extra["alpha"])
    assert 0.0 <= alpha <= 1.0 and alpha != 0.5
    assert all(k.startswith("shared.") for k in next(iter(uploads.values())).arrays)


def test_fedala_with_unit_weights_takes_the_global_model(clients):
    cfg = tiny_config("method=fedala", "algorithm.eta=0.0")
    alg, model, g, states, _ = run_rounds(cfg, clients[:1], rounds=2)
    st = states[clients[0].name]
    weights = sub(st.extra, "ala_w/")
    assert set(weights) == set(alg.ala_keys(model)) == {"head.weight", "head.bias"}
    assert all(torch.equal(w, torch.ones_like(w)) for w in weights.values())  # eta=0: W stays 1
    alg.personalize(model, g, st)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, g[SHARED + k], rtol=0, atol=1e-6)


def test_fedala_learns_weights_only_for_its_layers(clients):
    # Two clients: with one, the global model is its own and ALA has nothing to weigh.
    alg, model, g, states, _ = run_rounds(
        tiny_config("method=fedala", "algorithm.eta=50.0"), clients[:2], rounds=3
    )
    st = states[clients[0].name]
    weights = sub(st.extra, "ala_w/")
    assert any(not torch.equal(w, torch.ones_like(w)) for w in weights.values())
    assert all(((w >= 0) & (w <= 1)).all() for w in weights.values())
    alg.personalize(model, g, st)
    sd = model.state_dict()
    lower = [k for k in sd if not k.startswith("head.")]
    assert all(torch.equal(sd[k], g[SHARED + k]) for k in lower)  # lower layers: the global model


def test_centralized_sees_every_training_image_once_per_epoch(tmp_path, monkeypatch):
    cfg = tiny_config("method=centralized", "train.local_epochs=2", "federation.rounds=1")
    epochs = []
    real = engine.batches

    def spy(n, batch_size, gen):
        out = list(real(n, batch_size, gen))
        epochs.append(torch.cat(out).tolist())
        return iter(out)

    monkeypatch.setattr(engine, "batches", spy)
    clients = prepare_clients(cfg.data)
    summary = run_experiment(cfg, tmp_path / "c", progress=False, clients=clients)
    total = sum(len(c.train) for c in clients)
    assert len(epochs) == 2
    for seen in epochs:
        assert sorted(seen) == list(range(total))
    assert summary["breaks_privacy"] is True and summary["comm"]["bytes_up_per_round"] == 0


def test_feddp_keeps_its_query_projection_personal(clients):
    alg, model, g, states, uploads = run_rounds(tiny_config("method=feddp"), clients)
    q = keys_of_children(model, ("query_proj",))
    assert q and set(alg.partition(model).personal) == q
    for up in uploads.values():
        assert not uploaded_keys(up) & q
    assert model.attention_kind == "self" and not hasattr(model, "kv_bottleneck")
    # Each site keeps its own projection: they differ after local training.
    qs = [next(iter(st.personal.values())) for st in states.values()]
    assert not torch.equal(qs[0], qs[1])


def test_feddp_calibration_weights_pixels_where_sites_disagree(clients):
    cfg = tiny_config("method=feddp")
    alg, model, g, states, _ = run_rounds(cfg, clients)
    payload = {**g, **alg.finetune_payload(g, states)}
    assert len(alg.site_models(model, payload)) == len(clients)
    loss_fn = alg.finetune_loss(model, payload)
    x, y = clients[0].train.x[:4], clients[0].train.y[:4]
    z = torch.zeros_like(y)
    calibrated = loss_fn(z, y, torch.Generator(), x)
    assert calibrated > alg.seg_loss(z, y)  # the weighted BCE term adds a positive amount
    lam0 = build_algorithm(tiny_config("method=feddp", "algorithm.lam=0.0"))
    assert torch.equal(
        lam0.finetune_loss(model, payload)(z, y, torch.Generator(), x), alg.seg_loss(z, y)
    )


@pytest.mark.parametrize("method", sorted(set(ALGORITHMS.names()) - {"fedoap"}))
def test_every_method_runs_end_to_end(tmp_path, method):
    s = run_experiment(
        tiny_config(f"method={method}", "federation.rounds=1"),
        tmp_path / method,
        progress=False,
    )
    assert s["method"] == method
    assert all(0 <= c["test"]["dice"] <= 1 for c in s["clients"].values())
