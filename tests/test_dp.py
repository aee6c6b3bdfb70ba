"""Sample-level DP-SGD: Opacus's per-sample gradients of the FedOAP
network equal a loop over single examples, for every parameter (instance norm, the decoupled
cross-attention, the adapter and head included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedoap.algorithms import build_algorithm
from fedoap.config import ConfigError
from tests.conftest import tiny_config

opacus = pytest.importorskip("opacus", reason='needs the [dp] extra: pip install -e ".[dp]"')


def without_inplace(model: torch.nn.Module) -> torch.nn.Module:
    """The network's ReLUs are in-place, which Opacus's backward hooks cannot see through
    ("Output 0 of BackwardHookFunction is a view and is being modified inplace"); out of place
    they compute the same function."""
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = False  # type: ignore[assignment]
    return model


def bce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(out, y, reduction="sum")


@pytest.mark.parametrize("kv", ["weights", "bank"])
def test_opacus_per_sample_gradients_equal_a_loop_over_single_examples(kv):
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    cfg = tiny_config(f"model.kv.mode={kv}", "train.precision=fp32")
    model = without_inplace(build_algorithm(cfg).build_model().double())
    if kv == "bank":
        model.set_kv_bank(torch.randn(16, model.bottleneck_channels, dtype=torch.float64))
    assert ModuleValidator.validate(model, strict=False) == []  # no batch norm, nothing to fix
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 32, 32, generator=gen, dtype=torch.float64)
    y = (torch.rand(3, 1, 32, 32, generator=gen) > 0.5).double()
    loop = []
    for i in range(3):
        model.zero_grad()
        bce(model(x[i : i + 1]), y[i : i + 1]).backward()
        loop.append({n: p.grad.clone() for n, p in model.named_parameters()})  # type: ignore[union-attr]
    model.zero_grad()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    bce(gsm(x), y).backward()
    params = dict(model.named_parameters())
    assert params and all(getattr(p, "grad_sample", None) is not None for p in params.values())
    worst = max(
        float((p.grad_sample[i] - loop[i][n]).abs().max())  # type: ignore[union-attr]
        for n, p in params.items()
        for i in range(3)
    )
    assert worst < 1e-10, worst  # 1.1e-13 in float64 on an AMD EPYC
    # And the per-sample gradients are not all alike: the check compares real numbers.
    some = next(iter(params.values())).grad_sample  # type: ignore[union-attr]
    assert not torch.allclose(some[0], some[1])


# ------------------------------------------------------------------ DP-SGD in the engine


def test_the_per_image_loss_is_a_mean_of_per_example_terms_the_batch_dice_is_not():
    from fedoap.losses import SegLoss

    gen = torch.Generator().manual_seed(1)
    z = torch.randn(4, 1, 8, 8, generator=gen)
    y = (torch.rand(4, 1, 8, 8, generator=gen) > 0.6).float()
    for per_image, equal in ((True, True), (False, False)):
        loss = SegLoss(per_image=per_image)
        mean = torch.stack([loss(z[i : i + 1], y[i : i + 1]) for i in range(4)]).mean()
        assert torch.isclose(loss(z, y), mean, atol=1e-6).item() is equal


def test_a_dp_sgd_step_is_the_mean_of_clipped_per_example_gradients_of_a_poisson_batch():
    """With zero noise and plain SGD (lr 1) one DP step moves the weights by exactly
    -(1/B) sum_i clip(g_i) over the examples a Poisson draw took: sampling, clipping and the
    division by the expected batch size, against a loop over single examples."""
    from fedoap.data.dataset import Split
    from fedoap.losses import SegLoss
    from fedoap.privacy import SiteDP
    from fedoap.training.dp import dp_train_epochs

    cfg = tiny_config("train.precision=fp32")
    model = build_algorithm(cfg).build_model().double()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, 1, 32, 32, generator=gen, dtype=torch.float64)
    y = (torch.rand(10, 1, 32, 32, generator=gen) > 0.7).double()
    loss = SegLoss(per_image=True)
    dp = SiteDP(0.0, 0.05, 0.5, 1, 4, 1e-3, "prv", 1, None)  # C = 0.05: every gradient clipped
    take = torch.nonzero(torch.rand(10, generator=torch.Generator().manual_seed(7)) < 0.5)
    assert 1 < len(take) < 10
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = {n: torch.zeros_like(p) for n, p in before.items()}
    norms = []
    for i in take.flatten().tolist():
        model.zero_grad()
        loss(model(x[i : i + 1]), y[i : i + 1]).backward()
        g = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
        norm = torch.sqrt(sum(v.square().sum() for v in g.values()))  # type: ignore[arg-type]
        norms.append(float(norm))
        for n in g:
            expected[n] -= g[n] * min(1.0, 0.05 / (float(norm) + 1e-6)) / 4
    assert min(norms) > 0.05  # the clip is active for every example
    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    split = Split(x, y, None, None)  # type: ignore[arg-type]
    dp_train_epochs(
        model,
        opt,
        split,
        1,
        lambda z, t, g, xx: loss(z, t),
        torch.Generator().manual_seed(7),
        dp,
        "fp32",
    )
    worst = max(
        float((p.detach() - before[n] - expected[n]).abs().max())
        for n, p in model.named_parameters()
    )
    assert worst < 1e-9, worst
    # The network is left as it was: in-place activations back, no Opacus attributes.
    assert any(getattr(m, "inplace", False) for m in model.modules())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_a_case_level_dp_step_is_the_mean_of_clipped_per_case_gradients():
    """privacy.dp.unit=case: with zero noise and plain SGD (lr 1) one step moves the weights by
    exactly -(1/B) sum_c clip(g_c) over the cases a Poisson draw took, where g_c is the gradient
    of the mean loss over case c's images: against a loop over cases."""
    from fedoap.data.dataset import Split
    from fedoap.losses import SegLoss
    from fedoap.privacy import SiteDP
    from fedoap.training.dp import dp_train_epochs

    cfg = tiny_config("train.precision=fp32")
    model = build_algorithm(cfg).build_model().double()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, 1, 32, 32, generator=gen, dtype=torch.float64)
    y = (torch.rand(10, 1, 32, 32, generator=gen) > 0.7).double()
    # Five cases of 1-3 images, not contiguous (p2's images are the 6th and the last); they
    # are numbered in order of first appearance: p3, p1, p2, p4, p5.
    cases = np.array(["p3", "p3", "p1", "p1", "p1", "p2", "p4", "p4", "p5", "p2"])
    order = ["p3", "p1", "p2", "p4", "p5"]
    loss = SegLoss(per_image=True)
    dp = SiteDP(0.0, 0.05, 0.5, 1, 2, 1e-3, "prv", 1, None, "case")  # B = 2 cases
    taken = torch.rand(5, generator=torch.Generator().manual_seed(7)) < 0.5
    took = [c for c, t in zip(order, taken.tolist(), strict=True) if t]
    assert 1 < len(took) < 5 and any((cases == c).sum() > 1 for c in took)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = {n: torch.zeros_like(p) for n, p in before.items()}
    norms = []
    for c in took:
        rows = torch.from_numpy(np.flatnonzero(cases == c))
        model.zero_grad()
        loss(model(x[rows]), y[rows]).backward()  # the mean over the case's images
        g = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
        norm = float(torch.sqrt(sum(v.square().sum() for v in g.values())))  # type: ignore[arg-type]
        norms.append(norm)
        for n in g:
            expected[n] -= g[n] * min(1.0, 0.05 / (norm + 1e-6)) / 2
    assert min(norms) > 0.05  # the clip is active for every case
    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    split = Split(x, y, cases, cases)
    dp_train_epochs(
        model,
        opt,
        split,
        1,
        lambda z, t, g, xx: loss(z, t),
        torch.Generator().manual_seed(7),
        dp,
        "fp32",
    )
    worst = max(
        float((p.detach() - before[n] - expected[n]).abs().max())
        for n, p in model.named_parameters()
    )
    assert worst < 1e-9, worst


def test_with_one_image_per_case_case_level_dp_is_image_level_dp_bit_for_bit():
    """Cases are numbered in order of first appearance, so where each case is one image (breast
    ultrasound, Kvasir) the case-level draws, clipping and noise are the image-level ones."""
    from fedoap.data.dataset import Split
    from fedoap.losses import SegLoss
    from fedoap.privacy import SiteDP
    from fedoap.training.dp import dp_train_epochs

    cfg = tiny_config("train.precision=fp32")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(12, 1, 32, 32, generator=gen)
    y = (torch.rand(12, 1, 32, 32, generator=gen) > 0.7).float()
    names = np.array([f"case{k}" for k in (7, 3, 11, 0, 5, 9, 1, 10, 2, 8, 4, 6)])  # unsorted
    loss = SegLoss(per_image=True)
    weights = {}
    for unit in ("image", "case"):
        model = build_algorithm(cfg).build_model()
        dp = SiteDP(1.0, 1.0, 0.25, 4, 3, 1e-3, "prv", 8, None, unit)
        dp_train_epochs(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            Split(x, y, names, names),
            2,
            lambda z, t, g, xx: loss(z, t),
            torch.Generator().manual_seed(5),
            dp,
            "fp32",
        )
        weights[unit] = {k: v.clone() for k, v in model.state_dict().items()}
    initial = build_algorithm(cfg).build_model().state_dict()
    assert any(not torch.equal(initial[k], weights["image"][k]) for k in initial)  # it trained
    for k in weights["image"]:
        assert torch.equal(weights["image"][k], weights["case"][k]), k


def run_dp(tmp_path, name, *over):
    from fedoap.api import run_experiment

    cfg = tiny_config("train.precision=fp32", *over)
    return run_experiment(cfg, tmp_path / name, progress=False)


def test_the_budget_covers_every_step_fine_tuning_included_and_meets_the_target(tmp_path):
    from fedoap.data import prepare_clients
    from fedoap.privacy import epsilon_spent, group_privacy

    over = (
        "method=local",
        "federation.rounds=2",
        "finetune.epochs=1",
        "privacy.dp.enabled=true",
        "privacy.dp.epsilon=2",
    )
    s = run_dp(tmp_path, "local", *over)
    train_cases = {
        c.name: c.train.case_ids
        for c in prepare_clients(tiny_config("train.precision=fp32", *over).data)
    }
    clients = s["privacy"]["clients"]
    assert set(clients) == set(s["clients"]) and "privacy" not in s["clients"]["mri"]
    largest: dict[str, int] = {}
    for name, c in clients.items():
        n = s["clients"][name]["n"]["train"]
        per_epoch = max(1, round(n / 8))
        assert c["steps"] == c["planned_steps"] == (2 * 1 + 1) * per_epoch  # rounds x E + FT
        assert c["delta"] == pytest.approx(1 / (10 * n))
        assert 1.9 <= c["epsilon"] <= 2.0  # the target, spent to within the search's tolerance
        # Per patient: group privacy over the site's largest training case.
        k = int(np.unique(train_cases[name], return_counts=True)[1].max())
        largest[name] = k
        g, closed = c["patient_level"], group_privacy(c["epsilon"], c["delta"], k)
        assert g["max_images_per_case"] == k and g["meaningful"] == closed["meaningful"]
        assert g["epsilon"] == pytest.approx(k * c["epsilon"], abs=1e-3)
        assert g["delta"] == pytest.approx(closed["delta"], rel=1e-2)
        # Recomputed from the reported mechanism: the same epsilon; and more steps cost more.
        again = epsilon_spent(
            "prv", c["noise_multiplier"], c["sample_rate"], c["steps"], c["delta"]
        )
        assert again == pytest.approx(c["epsilon"], abs=1e-3)
        assert (
            epsilon_spent(
                "prv", c["noise_multiplier"], c["sample_rate"], 2 * c["steps"], c["delta"]
            )
            > c["epsilon"]
        )
    assert largest["mri"] > 1  # a synthetic MRI case is several slices: not the trivial k = 1


def test_case_level_dp_samples_and_accounts_cases_and_guarantees_each_patient(tmp_path):
    """privacy.dp.unit=case, end to end (method=local, so each site trains alone): the
    sampling rate, delta and steps count cases; the patient-level reading is the budget itself;
    a site whose cases are single images gets the image-level result exactly."""
    from fedoap.data import prepare_clients

    over = (
        "method=local",
        "federation.rounds=2",
        "finetune.epochs=1",
        "train.batch_size=2",
        "privacy.dp.enabled=true",
        "privacy.dp.epsilon=4",
    )
    from fedoap.federation.checkpoint import load_tensors

    by_case = run_dp(tmp_path, "case", *over, "privacy.dp.unit=case")
    by_image = run_dp(tmp_path, "image", *over)
    runs = ("case", "image")
    assert by_case["privacy"]["dp"].startswith("case-level")
    assert by_image["privacy"]["dp"].startswith("sample-level")
    data = {c.name: c for c in prepare_clients(tiny_config(*over).data)}
    for name, c in by_case["privacy"]["clients"].items():
        k = len(np.unique(data[name].train.case_ids))  # the site's training cases
        assert c["unit"] == "case" and c["sample_rate"] == pytest.approx(2 / k, abs=1e-6)
        assert c["delta"] == pytest.approx(1 / (10 * k))
        assert c["steps"] == c["planned_steps"] == (2 * 1 + 1) * max(1, round(k / 2))
        assert 3.9 <= c["epsilon"] <= 4.0
        patient = c["patient_level"]
        assert patient["epsilon"] == c["epsilon"] and patient["delta"] == c["delta"]
        assert patient["meaningful"]
    mri = by_case["privacy"]["clients"]["mri"]
    assert mri["patient_level"]["max_images_per_case"] > 1  # several slices: one unit
    # Image-level DP's per-patient reading (group privacy over 6 slices) is far weaker.
    image_mri = by_image["privacy"]["clients"]["mri"]["patient_level"]
    assert image_mri["epsilon"] > 5 * mri["patient_level"]["epsilon"]
    # us: one image per case, so the same model (its Dice to the last digit); mri differs.
    assert by_case["clients"]["us"]["test"] == by_image["clients"]["us"]["test"]
    final = {u: load_tensors(tmp_path / u / "checkpoints" / "last.safetensors")[0] for u in runs}
    for site, same in (("us", True), ("mri", False), ("ct", False)):
        keys = [k for k in final["case"] if f"/{site}/" in k]
        assert keys, (site, sorted(final["case"])[:5])
        equal = all(torch.equal(final["case"][k], final["image"][k]) for k in keys)
        assert equal == same, site


def test_case_level_dp_needs_more_cases_than_the_batch(tmp_path):
    over = ("method=local", "privacy.dp.enabled=true", "privacy.dp.epsilon=4")
    with pytest.raises(ConfigError, match=r"site 'mri' has 4 training cases.*counts cases"):
        run_dp(tmp_path, "x", *over, "privacy.dp.unit=case")  # train.batch_size=8
    assert not (tmp_path / "x").exists()


def test_group_privacy_is_the_basic_bound_and_says_when_it_guarantees_nothing():
    import math

    from fedoap.privacy import group_privacy

    one = group_privacy(0.7, 1e-5, 1)
    assert one == {"max_images_per_case": 1, "epsilon": 0.7, "delta": 1e-5, "meaningful": True}
    three = group_privacy(0.5, 1e-5, 3)  # (k eps, k e^((k-1) eps) delta)
    assert three["epsilon"] == 1.5 and three["meaningful"]
    assert three["delta"] == pytest.approx(3 * math.e * 1e-5, rel=1e-12)
    # A brain-MRI patient of 40 slices at eps = 1 per slice: delta_k = 40 e^39 delta >= 1.
    brain = group_privacy(1.0, 1e-4, 40)
    assert brain["epsilon"] == 40.0 and brain["delta"] == 1.0 and not brain["meaningful"]
    with pytest.raises(ValueError, match="k must be >= 1"):
        group_privacy(1.0, 1e-5, 0)


def test_dp_fedavg_clips_each_update_averages_equally_and_adds_noise_of_z_c_over_k():
    from fedoap.aggregation.dp import dp_fedavg
    from fedoap.basetypes import Update

    g = {"shared.w": torch.zeros(3)}
    ups = [
        Update({"shared.w": torch.tensor([2.0, 0.0, 0.0])}, 100),  # norm 2: halved by C = 1
        Update({"shared.w": torch.tensor([0.0, 0.5, 0.0])}, 1),  # norm 0.5: kept
    ]
    out = dp_fedavg(g, ups, ["shared.w"], 1.0, 0.0, torch.Generator().manual_seed(0))
    assert torch.allclose(out["shared.w"], torch.tensor([0.5, 0.25, 0.0]))  # weights ignored
    big = {"shared.w": torch.zeros(200_000)}
    same = [Update({"shared.w": torch.zeros(200_000)}, 1) for _ in range(4)]
    noisy = dp_fedavg(big, same, ["shared.w"], 1.0, 2.0, torch.Generator().manual_seed(0))
    assert float(noisy["shared.w"].std()) == pytest.approx(2.0 * 1.0 / 4, rel=0.01)


def test_client_level_dp_is_accounted_per_round(tmp_path):
    s = run_dp(
        tmp_path,
        "cdp",
        "method=fedavg",
        "federation.rounds=2",
        "privacy.client_dp.enabled=true",
        "privacy.client_dp.noise_multiplier=1.5",
    )
    c = s["privacy"]["client_level"]
    assert c["rounds"] == 2 and c["delta"] == pytest.approx(1 / 30)
    # RDP of 2 Gaussian mechanisms of multiplier 1.5, converted at delta: below the classic
    # bound min_a 2 a / (2 s^2) + log(1/delta) / (a - 1) (Mironov 2017; Opacus's is tighter).
    import math

    classic = min(
        2 * a / (2 * 1.5**2) + math.log(30) / (a - 1) for a in [1 + i / 10 for i in range(1, 400)]
    )
    assert 0.5 * classic < c["epsilon"] <= classic


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy.dp.enabled=true"], "privacy.dp: give exactly one of epsilon"),
        (
            ["privacy.dp.enabled=true", "privacy.dp.epsilon=1", "privacy.dp.noise_multiplier=1"],
            "privacy.dp: give exactly one of epsilon",
        ),
        (["privacy.dp.enabled=true", "privacy.dp.epsilon=0"], "privacy.dp.epsilon: must be > 0"),
        (["privacy.dp.enabled=true", "privacy.dp.epsilon=-1"], "privacy.dp.epsilon: must be > 0"),
        (["privacy.dp.epsilon=3"], "privacy.dp: options given but privacy.dp.enabled is false"),
        (
            ["privacy.dp.enabled=true", "privacy.dp.epsilon=3", "model.kv.mode=bank"],
            "model.kv.mode=bank: its K/V summaries",
        ),
        (
            ["privacy.dp.enabled=true", "privacy.dp.epsilon=3", "train.precision=fp16"],
            "train.precision=fp16",
        ),
        (
            ["privacy.dp.enabled=true", "privacy.dp.epsilon=3", "train.channels_last=true"],
            "train.channels_last=true: Opacus sums per-example gradients",
        ),
        (
            ["privacy.client_dp.enabled=true", "federation.aggregator=median"],
            "privacy.client_dp: DP-FedAvg clips and averages",
        ),
        (
            ["privacy.client_dp.enabled=true", "federation.fraction=0.5"],
            "privacy.client_dp: its accountant assumes every site",
        ),
    ],
)
def test_dp_settings_no_accountant_can_use_are_config_errors(overrides, message):
    from fedoap.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        tiny_config(*overrides)


def test_dp_refuses_a_method_it_cannot_account_and_an_unreachable_budget(tmp_path):
    from fedoap.config import ConfigError

    with pytest.raises(ConfigError, match="privacy.dp: method fedprox is not supported under DP"):
        build_algorithm(
            tiny_config("method=fedprox", "privacy.dp.enabled=true", "privacy.dp.epsilon=3")
        )
    with pytest.raises(ConfigError, match="privacy.client_dp: method local shares nothing"):
        build_algorithm(tiny_config("method=local", "privacy.client_dp.enabled=true"))
    # Before any training: a site whose training set is not above the batch size, and a budget
    # no noise multiplier reaches.
    with pytest.raises(ConfigError, match=r"privacy.dp: site 'mri' has \d+ training images"):
        run_dp(
            tmp_path,
            "b",
            "method=fedavg",
            "train.batch_size=64",
            "privacy.dp.enabled=true",
            "privacy.dp.epsilon=3",
        )
    with pytest.raises(
        ConfigError, match=r"privacy.dp.epsilon=0.0001: the prv accountant finds no"
    ):
        run_dp(
            tmp_path, "e", "method=fedavg", "privacy.dp.enabled=true", "privacy.dp.epsilon=0.0001"
        )
    assert not (tmp_path / "b").exists() and not (tmp_path / "e").exists()  # nothing ran


def test_dp_sgd_keeps_weights_in_the_contiguous_layout_on_cuda_too():
    """Opacus's summed per-example gradients are contiguous; a channels_last weight then makes
    CUDA's fused AdamW fail (seen on an H200). Unset, channels_last is off under DP on CUDA."""
    from fedoap.training.device import uses_channels_last

    cfg = tiny_config()
    cuda = torch.device("cuda")
    assert uses_channels_last(cfg.train, cuda)  # the default elsewhere on CUDA
    assert not uses_channels_last(cfg.train, cuda, per_example_grads=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_a_dp_sgd_fedoap_run_on_cuda_spends_its_budget_and_reports_contiguous_weights(tmp_path):
    """On an H200, DP-SGD with channels_last weights failed in CUDA's fused AdamW (the summed
    per-example gradients are contiguous). The whole run, with fine-tuning, must now pass there."""
    s = run_dp(
        tmp_path,
        "fedoap-cuda",
        "train.device=cuda",
        "federation.rounds=2",
        "finetune.epochs=1",
        "privacy.dp.enabled=true",
        "privacy.dp.epsilon=4",
    )
    assert s["execution"]["device"].startswith("cuda")
    assert s["execution"]["channels_last"] is False
    for c in s["privacy"]["clients"].values():
        assert c["steps"] == c["planned_steps"] > 0
        assert 3.9 <= c["epsilon"] <= 4.0


def test_the_run_table_prints_each_sites_per_patient_reading(monkeypatch, capsys):
    from fedoap.cli import main
    from fedoap.privacy import group_privacy

    monkeypatch.setattr(main.console, "width", 200)
    test = {"dice": 0.5, "iou": 0.4, "hd95_px": 3.0, "case_dice": 0.5}
    client = {"n": {"train": 10, "val": 2, "test": 2}, "best_round": 1, "val": {"dice": 0.5}}
    spent = {  # one image per case; 3 slices at a small epsilon; 9 slices at epsilon 1
        "us": group_privacy(1.0, 1e-3, 1),
        "ct": group_privacy(0.1, 1e-5, 3),
        "mri": group_privacy(1.0, 5e-4, 9),
        "cvc": {"max_images_per_case": 27, "epsilon": 1.0, "delta": 1e-3, "meaningful": True},
    }
    unit = {"cvc": "case"}  # case-level DP-SGD: its budget is per video already
    summary = {
        "clients": {name: {**client, "test": test} for name in spent},
        "mean": {"test": test},
        "privacy": {
            "clients": {
                name: {
                    "epsilon": 1.0,
                    "delta": 1e-3,
                    "patient_level": g,
                    "unit": unit.get(name, "image"),
                }
                for name, g in spent.items()
            }
        },
        "params": {"shared": 1, "personal": 1},
        "time": {"seconds_total": 1.0, "seconds_per_round": 1.0},
        "comm": {"bytes_up_per_round": 1, "bytes_down_per_round": 1},
    }
    main.print_summary(summary, "t")
    rows = {
        ln.split("│")[1].strip(): ln for ln in capsys.readouterr().out.splitlines() if "│" in ln
    }
    assert rows["us"].split("│")[-2].strip() == "= per image"
    assert rows["ct"].split("│")[-2].strip() == "0.30 (k=3)"
    assert rows["mri"].split("│")[-2].strip() == "none (k=9)"  # 9 e^8 5e-4 >= 1
    assert rows["cvc"].split("│")[-2].strip() == "= ε (per case)"


def test_only_the_methods_tested_under_dp_declare_it_and_subclasses_declare_their_own():
    """``supports_dp`` is inherited like any class attribute: a method derived from FedAvg that
    changes training or aggregation must declare False again, so the set is checked here."""
    from fedoap.algorithms import ALGORITHMS

    supported = {n for n in ALGORITHMS.names() if ALGORITHMS.get(n).supports_dp}
    assert supported == {"fedavg", "fedoap", "local"}
    refused = ALGORITHMS.names()
    for name in refused:
        if name in supported:
            continue
        with pytest.raises(ConfigError, match=f"privacy.dp: method {name} is not supported"):
            build_algorithm(
                tiny_config(f"method={name}", "privacy.dp.enabled=true", "privacy.dp.epsilon=3")
            )
