"""The algorithm objects, independent of any runner: uploads, aggregation, client state."""

from __future__ import annotations

import pytest
import torch

from fedoap.aggregation import build_aggregation, weighted_mean
from fedoap.algorithms import FitContext, build_algorithm
from fedoap.algorithms.fedoap import BANK, SUMMARY, kmeans, kv_summary
from fedoap.basetypes import SHARED, Update
from fedoap.data import prepare_clients
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def client():
    return prepare_clients(tiny_config().data)[0]


def fit_once(cfg, client, global_arrays=None):
    alg = build_algorithm(cfg)
    model = alg.build_model()
    g = global_arrays if global_arrays is not None else alg.init_global(model)
    state = alg.init_client(model)
    update, new_state = alg.fit(model, g, state, client, FitContext(client.name, 1, cfg.seed))
    return alg, model, g, update, new_state


@pytest.mark.parametrize("mode", ["weights", "bank"])
def test_fedoap_never_uploads_personal_keys(client, mode):
    cfg = tiny_config(f"model.kv.mode={mode}")
    alg, model, _, update, _ = fit_once(cfg, client)
    part = alg.partition(model)
    shared_sent = {k[len(SHARED) :] for k in update.arrays if k.startswith(SHARED)}
    assert shared_sent == set(part.shared)
    assert not shared_sent & set(part.personal)
    assert all(k.startswith(("shared.", "kv.")) for k in update.arrays)
    assert (SUMMARY in update.arrays) == (mode == "bank")
    personal_modules = {k.split(".")[0] for k in part.personal}
    assert personal_modules == {"bottleneck", "query_proj", "adapter", "head"}
    assert update.num_examples == len(client.train)


def test_local_uploads_nothing_and_fedavg_everything(client):
    _, model, _, update, _ = fit_once(tiny_config("method=local"), client)
    assert update.arrays == {}
    _, model, _, update, _ = fit_once(tiny_config("method=fedavg"), client)
    assert {k[len(SHARED) :] for k in update.arrays} == set(model.state_dict())


def test_aggregate_is_the_example_weighted_mean():
    # Prepare
    cfg = tiny_config("method=fedavg")
    alg = build_algorithm(cfg)
    torch.manual_seed(0)
    shapes = {"shared.a": (3, 2), "shared.b": (4,)}
    counts = [10, 30, 60]
    updates = [Update({k: torch.randn(s) for k, s in shapes.items()}, n) for n in counts]
    # Execute
    zeros = {k: torch.zeros(s) for k, s in shapes.items()}
    new = alg.aggregate(zeros, updates, {}, build_aggregation(cfg))
    # Assert
    for k in shapes:
        expected = (
            10 * updates[0].arrays[k] + 30 * updates[1].arrays[k] + 60 * updates[2].arrays[k]
        ) / 100
        torch.testing.assert_close(new[k], expected)


def test_weighted_mean_of_integer_buffers_takes_the_max():
    ups = [Update({"shared.n": torch.tensor(3)}, 1), Update({"shared.n": torch.tensor(7)}, 5)]
    assert weighted_mean(ups, ["shared.n"])["shared.n"] == 7


def test_client_state_persists_personal_weights_and_optimizer(client):
    cfg = tiny_config()
    alg, model, g, update, state = fit_once(cfg, client)
    part = alg.partition(model)
    assert set(state.personal) == set(part.personal)
    assert set(state.optimizers) == {"fit"}
    steps = next(iter(state.optimizers["fit"]["state"].values()))["step"].item()
    assert steps == -(-len(client.train) // cfg.train.batch_size)
    # A new global payload changes the shared part only; the personal part comes from the state.
    new_global = {k: v + 1.0 for k, v in g.items()}
    alg.load(model, new_global, state)
    sd = model.state_dict()
    for k in part.personal:
        torch.testing.assert_close(sd[k], state.personal[k])
    for k in part.shared:
        torch.testing.assert_close(sd[k], new_global[SHARED + k])


def test_fit_is_deterministic_given_seed_round_and_client(client):
    cfg = tiny_config()
    *_, u1, _ = fit_once(cfg, client)
    *_, u2, _ = fit_once(cfg, client)
    assert all(torch.equal(u1.arrays[k], u2.arrays[k]) for k in u1.arrays)


@pytest.mark.parametrize("summary", ["kmeans", "token_mean"])
def test_bank_summary_is_bounded_and_merged(client, summary):
    cfg = tiny_config("model.kv.mode=bank", f"model.kv.summary={summary}", "model.kv.bank_size=5")
    alg, model, g, update, state = fit_once(cfg, client)
    c = model.bottleneck_channels
    tokens = (cfg.data.image_size // 2**cfg.model.depth) ** 2
    rows = 5 if summary == "kmeans" else tokens
    assert update.arrays[SUMMARY].shape == (rows, c)
    # The summary's size does not grow with the client's data (a statistic, not tokens).
    for n in (6, 40):
        x = torch.randn(n, 1, cfg.data.image_size, cfg.data.image_size)
        s = kv_summary(model, x, cfg.model.kv, torch.Generator().manual_seed(0), "fp32")
        assert s.shape == (rows, c)
    other = Update({**update.arrays, SUMMARY: update.arrays[SUMMARY] + 1}, update.num_examples * 3)
    merged = alg.aggregate(g, [update, other], {}, build_aggregation(cfg))
    if summary == "kmeans":
        assert merged[BANK].shape == (10, c)
    else:
        torch.testing.assert_close(merged[BANK], update.arrays[SUMMARY] + 0.75)
    # The bank is used in the next round: the model attends to it.
    alg.load(model, merged, state)
    assert model.kv_bank is not None and model.kv_bank.shape == merged[BANK].shape


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    pts = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centers])
    found = kmeans(pts, 3, 10, g)
    dist = torch.cdist(centers, found).min(1).values
    assert (dist < 0.2).all()


# ------------------------------------------------------------ FedOAP for sites with few patients


def test_the_zero_gate_shuts_the_attention_and_stays_personal(client):
    """At zero the gated block is the site's own query stream alone: the shared K/V branch
    does not change the output; the gate still gets a gradient, and never leaves the site."""
    cfg = tiny_config("algorithm.gate=true")
    alg, model, _, update, _ = fit_once(cfg, client)
    fresh = alg.build_model()
    x = client.train.x[:4]
    before = fresh(x).detach()
    with torch.no_grad():
        for p in fresh.kv_bottleneck.parameters():
            p.add_(1.0)
    torch.testing.assert_close(fresh(x).detach(), before)
    fresh(x).sum().backward()
    assert fresh.gate.scale.grad is not None and fresh.gate.scale.grad.abs().sum() > 0
    assert "gate.scale" in alg.partition(model).personal
    assert not any("gate" in k for k in update.arrays)
    assert model.gate.scale.abs().sum() > 0  # training opened it
    assert not hasattr(build_algorithm(tiny_config()).build_model(), "gate.scale")


def test_the_fine_tuning_prox_term_holds_the_model_at_its_start(client):
    """mu large: fine-tuning moves the weights much less far from theta_0, which the site keeps
    (AdamW normalises its steps, so even a huge mu leaves them about one step size away)."""
    moved = {}
    for mu in (0.0, 1e4):
        cfg = tiny_config(f"algorithm.ft_prox={mu}", "train.lr=0.01")
        alg = build_algorithm(cfg)
        model = alg.build_model()
        start = {k: v.clone() for k, v in model.state_dict().items()}
        state = alg.start_finetune(start, alg.init_client(model))
        _, state = alg.finetune_epoch(
            model, alg.init_global(model), state, client, FitContext("c", 3, 0), first=True
        )
        moved[mu] = sum(
            float((state.personal[k] - start[k]).norm())
            for k in start
            if start[k].is_floating_point()
        )
        assert any(k.startswith("finetune_anchor/") for k in state.extra) == (mu > 0)
    assert moved[1e4] < 0.5 * moved[0.0]
