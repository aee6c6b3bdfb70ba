"""The benchmark runner, adaptation to an unseen client, and the report, on a tiny federation."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
import torch
import yaml

from fedoap.adapt import adapt
from fedoap.api import run_experiment
from fedoap.bench import is_done, load_spec, plan, run_bench, select_variants
from fedoap.data.synthetic import generate_client
from tests.conftest import REPO, tiny_config

GOALS = REPO / "benchmarks" / "analysis" / "goals.py"


@pytest.fixture(scope="module")
def npz_clients(tmp_path_factory):
    """Three tiny synthetic clients saved as .npz (so one can be held out by path)."""
    root = tmp_path_factory.mktemp("data")
    for name, style in (("mri", "mri"), ("us", "ultrasound"), ("ct", "ct")):
        raw = generate_client(style, 30, 32, name)
        np.savez(
            root / f"{name}.npz",
            images=raw.images,
            masks=raw.masks,
            case_ids=raw.case_ids,
            names=raw.names,
        )
    return root


def tiny_npz_config(root, *overrides):
    clients = [{"name": n, "source": "npz", "path": f"{n}.npz"} for n in ("mri", "us", "ct")]
    cfg = tiny_config(*overrides).to_dict()
    cfg["data"]["root"] = str(root)
    cfg["data"]["clients"] = clients
    return cfg


@pytest.fixture(scope="module")
def federation_without_ct(npz_clients, tmp_path_factory):
    """FedOAP federated on mri + us; ct is held out. Returns (run folder, config)."""
    from fedoap.config import Config, from_dict, validate

    data = tiny_npz_config(npz_clients, "train.num_threads=1")
    data["data"]["clients"] = data["data"]["clients"][:2]
    cfg = from_dict(Config, data)
    validate(cfg)
    run = tmp_path_factory.mktemp("fed") / "run"
    run_experiment(cfg, run, progress=False)
    return run, cfg


def test_adapt_to_an_unseen_client(npz_clients, federation_without_ct):
    run, cfg = federation_without_ct
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen_threads = []

    class Threads(logging.Handler):  # the thread count while adapt logs its progress
        def emit(self, record: logging.LogRecord) -> None:
            seen_threads.append(torch.get_num_threads())

    log = logging.getLogger("fedoap.adapt")
    handler, level = Threads(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        s = adapt(run, npz_clients / "ct.npz", "ct", epochs=2)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
        log.removeHandler(handler)
        log.setLevel(level)
    # The federation's train.num_threads applies inside, and the process's count is restored.
    assert seen_threads and set(seen_threads) == {1} and after == 2
    for key in ("zero_shot", "adapted", "local_only", "local_full"):
        assert 0 <= s[key]["test"]["dice"] <= 1
    assert s["init"] == "averaged" and 0 <= s["adapted"]["best_epoch"] <= 2
    assert s["local_full"]["epochs"] == cfg.federation.rounds * cfg.train.local_epochs + 2
    with pytest.raises(ValueError, match="was part of the federation"):
        adapt(run, npz_clients / "us.npz", "us")
    with pytest.raises(ValueError, match="--init must be one of"):
        adapt(run, npz_clients / "ct.npz", "ct", init="best")


def test_adapt_nearest_starts_from_the_best_donor_on_validation(npz_clients, federation_without_ct):
    run, _ = federation_without_ct
    s = adapt(run, npz_clients / "ct.npz", "ct", epochs=1, init="nearest")
    assert set(s["init_val"]) == {"mri", "us"}
    donor = max(s["init_val"], key=s["init_val"].get)
    assert s["init_from"] == donor
    # Zero-shot *is* the donor's personal parts: its validation score is the donor's score.
    assert s["zero_shot"]["val"]["dice"] == pytest.approx(s["init_val"][donor], abs=1e-6)


def test_bench_runs_caches_and_writes_results(npz_clients, tmp_path):
    cfg_path = tmp_path / "base.yaml"
    cfg_path.write_text(
        yaml.safe_dump(tiny_npz_config(npz_clients, "federation.rounds=1", "finetune.epochs=1"))
    )
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "base": "base.yaml",
                "methods": ["fedoap", "local"],
                "seeds": [0],
                "ablations": [{"name": "no_pbl", "overrides": ["finetune.pbl.enabled=false"]}],
                "loo": {"methods": ["fedavg"], "seeds": [0], "epochs": 1},
                "examples_per_client": 2,
            }
        )
    )
    spec, bases = load_spec(spec_path)
    cells = plan(spec, bases)
    assert [c.kind for c in cells] == ["main", "main", "ablation", "loo", "loo", "loo"]
    out = tmp_path / "out"
    run_bench(spec, bases, out, cells[:2], jobs=2)
    assert all(is_done(c, out) for c in cells[:2])
    mtimes = {
        c.key: (out / "cells" / c.key / "run" / "summary.json").stat().st_mtime for c in cells[:2]
    }
    run_bench(spec, bases, out, cells, jobs=1)  # extends; the first two are cached
    for key, t in mtimes.items():
        assert (out / "cells" / key / "run" / "summary.json").stat().st_mtime == t
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    kinds = {(r["kind"], r["variant"]) for r in rows}
    assert ("main", "fedoap") in kinds and ("ablation", "fedoap-no_pbl") in kinds
    assert {r["variant"] for r in rows if r["kind"] == "loo"} >= {
        "fedavg:zero_shot",
        "fedavg:adapted",
        "fedavg:local_only",
    }
    main = [r for r in rows if r["kind"] == "main"]
    assert len(main) == 2 * 3  # methods x clients
    for r in main:
        assert (
            0 <= float(r["test_dice"]) <= 1 and r["val_curve"].count(";") == 1
        )  # 2 rounds incl. FT
    ex = np.load(out / "cells" / cells[0].key / "examples.npz")
    assert ex["mri/pred"].shape == (2, 32, 32)
    # A cell killed after its run but before its examples is not done; the next call writes
    # them without running it again.
    (out / "cells" / cells[0].key / "examples.npz").unlink()
    assert not is_done(cells[0], out, spec) and is_done(cells[0], out)
    summary_mtime = (out / "cells" / cells[0].key / "run" / "summary.json").stat().st_mtime
    run_bench(spec, bases, out, cells[:1], jobs=1)
    assert is_done(cells[0], out, spec)
    assert (out / "cells" / cells[0].key / "run" / "summary.json").stat().st_mtime == summary_mtime

    # The report regenerates from results.csv (plus the kept masks and the data, for the grid).
    from fedoap.report import make_report

    report = make_report(out, GOALS).read_text()
    for section in (
        "## All methods",
        "margin over the best baseline",
        "## The goals, measured",
        "## FedOAP ablations",
        "## Unseen client",
    ):
        assert section in report, section
    for fig in (
        "per_client_dice",
        "hd95_per_client",
        "dice_vs_round",
        "dice_vs_bytes",
        "ablations",
        "leave_one_out",
        "examples",
    ):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000, fig


def test_regimes_plan_the_matrix_once_per_regime(npz_clients, tmp_path):
    from fedoap.config import ConfigError

    for name, clients in (("three", ("mri", "us", "ct")), ("two", ("mri", "us"))):
        cfg = tiny_npz_config(npz_clients)
        cfg["data"]["clients"] = [c for c in cfg["data"]["clients"] if c["name"] in clients]
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    spec_path = tmp_path / "spec.yaml"
    spec = {
        "regimes": [{"name": "three", "base": "three.yaml"}, {"name": "two", "base": "two.yaml"}],
        "overrides": ["federation.rounds=1"],
        "methods": ["fedoap", "local"],
        "seeds": [0, 1],
    }
    spec_path.write_text(yaml.safe_dump(spec))
    bspec, bases = load_spec(spec_path)
    assert {k: len(v.data.clients) for k, v in bases.items()} == {"three": 3, "two": 2}
    assert all(b.federation.rounds == 1 for b in bases.values())  # shared overrides apply
    cells = plan(bspec, bases)
    assert len(cells) == 2 * 2 * 2
    assert {c.regime for c in cells} == {"three", "two"}
    assert all(c.key.startswith(f"{c.regime}-{c.variant}-seed") for c in cells)
    assert len({c.key for c in cells}) == len(cells)
    # Either base or regimes; regime names are distinct words.
    for bad in ({**spec, "base": "three.yaml"}, {**spec, "regimes": spec["regimes"][:1] * 2}):
        spec_path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError):
            load_spec(spec_path)


def test_a_regime_can_run_a_subset_of_the_methods(npz_clients, tmp_path):
    from fedoap.config import ConfigError

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_npz_config(npz_clients)))
    spec_path = tmp_path / "spec.yaml"
    spec = {
        "regimes": [
            {"name": "all", "base": "base.yaml"},
            {"name": "some", "base": "base.yaml", "methods": ["local"]},
        ],
        "methods": ["fedoap", "local", "fedavg"],
        "seeds": [0, 1],
    }
    spec_path.write_text(yaml.safe_dump(spec))
    bspec, bases = load_spec(spec_path)
    cells = plan(bspec, bases)
    by_regime = {r: sorted({c.method for c in cells if c.regime == r}) for r in ("all", "some")}
    assert by_regime == {"all": ["fedavg", "fedoap", "local"], "some": ["local"]}
    assert len(cells) == (3 + 1) * 2
    # --methods narrows both; a regime none of whose methods was asked for is skipped.
    assert {(c.regime, c.method) for c in plan(bspec, bases, methods=["fedoap"])} == {
        ("all", "fedoap")
    }
    # A regime may only narrow the spec's methods.
    spec["regimes"][1]["methods"] = ["ditto"]
    spec_path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="ditto"):
        load_spec(spec_path)


def test_a_flower_run_is_never_adapted_or_resumed_from_parts_the_server_lacks(
    npz_clients, federation_without_ct, tmp_path
):
    """A Flower server holds only the global weights (personal parts stay at the sites): adapt
    refuses the inits that need client models instead of silently starting them fresh, and
    --resume says why it cannot continue instead of blaming the config."""
    import json
    import shutil

    from fedoap.api import resume_experiment
    from fedoap.config import ConfigError
    from fedoap.federation.state import RunState, load_run_state, save_run_state
    from fedoap.runs import RunDir

    run, cfg = federation_without_ct
    flower_run = tmp_path / "flower-run"
    shutil.copytree(run, flower_run)
    rd = RunDir(flower_run)
    # What a Flower server checkpoints: the global arrays and its history, nothing of the sites.
    rs = load_run_state(rd)
    done = cfg.federation.rounds
    save_run_state(
        rd,
        RunState(cfg.digest(), rs.global_arrays, done=done, history=rs.history, runtime="flower"),
    )
    summary = json.loads((flower_run / "summary.json").read_text())
    (flower_run / "summary.json").write_text(json.dumps({**summary, "runtime": "flower"}))
    for init in ("averaged", "nearest"):
        with pytest.raises(ConfigError, match=r"a Flower run.*use --init fresh"):
            adapt(flower_run, npz_clients / "ct.npz", "ct", epochs=1, init=init)
    s = adapt(flower_run, npz_clients / "ct.npz", "ct", epochs=1, init="fresh")
    assert s["init"] == s["init_from"] == "fresh"
    (flower_run / "summary.json").unlink()  # as if the server had been killed
    with pytest.raises(ConfigError, match="was run on a Flower deployment: resume it there"):
        resume_experiment(flower_run, progress=False)


def test_an_attack_grid_runs_every_defence_and_keeps_a_divergence_as_its_outcome(
    npz_clients, tmp_path
):
    from fedoap.config import ConfigError
    from fedoap.report import make_report

    base = tiny_npz_config(npz_clients, "federation.rounds=2", "finetune.epochs=0")
    base["train"]["precision"] = "fp32"
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec_path = tmp_path / "spec.yaml"
    grid = {
        "clients": ["ct"],
        "kinds": ["nan"],
        "defences": [
            {"name": "none", "overrides": ["federation.validate_updates=false"]},
            {"name": "validation", "overrides": []},
            {"name": "median", "overrides": ["federation.aggregator=median"]},
        ],
    }
    spec_path.write_text(
        yaml.safe_dump({"base": "base.yaml", "methods": ["fedavg"], "seeds": [0], "attacks": grid})
    )
    spec, bases = load_spec(spec_path)
    cells = plan(spec, bases, kinds=("main", "attack"))
    # validation's clean run is the main cell, so it is not run twice.
    assert [c.variant for c in cells] == [
        "fedavg",
        "fedavg.none.clean",
        "fedavg.none.nan",
        "fedavg.validation.nan",
        "fedavg.median.clean",
        "fedavg.median.nan",
    ]
    # One column of the grid and the main cell, as `fedoap bench --variants` selects them; the
    # cells keep their keys, so a partial run fills the same results folder.
    some = select_variants(cells, ["fedavg", "fedavg.median.*"])
    assert [c.key for c in some] == [cells[0].key, cells[4].key, cells[5].key]
    with pytest.raises(ConfigError, match=r"--variants 'fedavg\.krum\.\*' matches no planned"):
        select_variants(cells, ["fedavg.krum.*"])
    out = tmp_path / "out"
    run_bench(spec, bases, out, cells, jobs=2)  # a divergence is no failure
    assert all(is_done(c, out, spec) for c in cells)
    diverged = (out / "cells" / cells[2].key / "diverged.txt").read_text()
    assert "validate_updates=false let every upload in" in diverged
    with open(out / "results.csv") as fh:
        rows = {(r["variant"], r["client"]): r for r in csv.DictReader(fh)}
    assert (
        rows[("fedavg.none.nan", "mri")]["diverged"]
        and not rows[("fedavg.none.nan", "mri")]["test_dice"]
    )
    assert rows[("fedavg.validation.nan", "ct")]["attacker"] == "1"
    assert rows[("fedavg.validation.nan", "mri")]["attacker"] == "0"
    assert rows[("fedavg.validation.nan", "mri")]["refused"] == "2"  # ct, both rounds
    # Each attack cell names its defence's clean run: validation's is the main cell (so the
    # report may stand the main cell in for it), median's is its own clean cell.
    main_digest = rows[("fedavg", "mri")]["config_digest"]
    assert rows[("fedavg.validation.nan", "mri")]["clean_digest"] == main_digest
    assert (
        rows[("fedavg.median.nan", "mri")]["clean_digest"]
        == rows[("fedavg.median.clean", "mri")]["config_digest"]
        != main_digest
    )
    # Refusing the NaN site leaves the honest two as if ct had sent nothing: validation + mean
    # and validation + median of two are both their mean, so the two rows agree exactly.
    for c in ("mri", "us"):
        assert (
            rows[("fedavg.validation.nan", c)]["test_dice"]
            == rows[("fedavg.median.nan", c)]["test_dice"]
        )
    report = make_report(out, GOALS).read_text()
    section = report[report.index("## Robustness") :]
    nan_row = next(ln for ln in section.splitlines() if ln.startswith("| nan"))
    assert nan_row.split("|")[2].strip() == "diverged"
    honest = np.mean(
        [float(rows[("fedavg.validation.nan", c)]["test_dice"]) for c in ("mri", "us")]
    )
    assert nan_row.split("|")[3].strip().startswith(f"{honest:.3f}")
    assert (out / "figures" / "robustness_fedavg.png").stat().st_size > 1000


def test_a_data_size_study_collects_cases_and_reports_them_per_patient(npz_clients, tmp_path):
    """Regimes that differ only in data.max_train_cases, a method variant with the safeguard, a
    selection variant in one regime and an ablation in the other: cases.csv holds every test
    case of every cell, and the report compares each with local patient by patient."""
    from fedoap.config import ConfigError
    from fedoap.report import make_report

    base = tiny_npz_config(npz_clients, "federation.rounds=1", "finetune.epochs=1")
    base["data"]["split"] = {"train": 0.4, "val": 0.15, "test": 0.45, "follow_run_seed": True}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {
        "regimes": [
            {"name": "cases-02", "base": "base.yaml", "overrides": ["data.max_train_cases=2"]},
            {"name": "cases-all", "base": "base.yaml"},
        ],
        "methods": ["local", "fedavg_ft"],
        "variants": [
            {"name": "fedavg_ft+sg", "method": "fedavg_ft", "overrides": ["safeguard.mode=choose"]},
            {
                "name": "local-select-dice",
                "method": "local",
                "overrides": ["train.select_metric=dice"],
                "regimes": ["cases-02"],
            },
        ],
        "ablation_method": "fedavg_ft",
        "ablations": [
            {"name": "more-ft", "overrides": ["finetune.epochs=2"], "regimes": ["cases-all"]}
        ],
        "seeds": [0],
        "examples_per_client": 1,
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    bspec, bases = load_spec(spec_path)
    cells = plan(bspec, bases)
    assert sorted((c.regime, c.kind, c.variant) for c in cells) == sorted(
        [(g, "main", v) for g in ("cases-02", "cases-all") for v in ("local", "fedavg_ft")]
        + [(g, "main", "fedavg_ft+sg") for g in ("cases-02", "cases-all")]
        + [
            ("cases-02", "main", "local-select-dice"),
            ("cases-all", "ablation", "fedavg_ft-more-ft"),
        ]
    )
    out = tmp_path / "out"
    run_bench(bspec, bases, out, cells, jobs=2)
    with open(out / "cases.csv") as fh:
        cases = list(csv.DictReader(fh))
    with open(out / "results.csv") as fh:
        results = list(csv.DictReader(fh))
    for r in results:  # every client's test cases, once per cell
        mine = [
            c
            for c in cases
            if (c["regime"], c["variant"], c["seed"], c["client"])
            == (r["regime"], r["variant"], r["seed"], r["client"])
        ]
        assert len(mine) == int(r["test_cases"]) > 0
        assert {c["train_cases"] for c in mine} == {r["train_cases"]}
        assert r["max_train_cases"] == ("2" if r["regime"] == "cases-02" else "")
        mean = sum(float(c["case_dice"]) for c in mine) / len(mine)
        assert mean == pytest.approx(float(r["test_case_dice"]), abs=1e-5)
        assert bool(r["safeguard_choice"]) == (r["variant"] == "fedavg_ft+sg")
    assert {int(r["train_cases"]) for r in results if r["regime"] == "cases-02"} == {2}

    report = make_report(out, GOALS).read_text()
    for section in (
        "# Per patient",
        "### cases-02: each method − local",
        "| fedavg_ft+sg |",
        "## The safeguard",
        "## Which validation metric selects the model",
        "## The goals, measured",
    ):
        assert section in report, section
    for fig in ("data_size_dice", "data_size_gain"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000, fig

    # Names that would collide, or regimes that do not exist, are refused by name.
    for bad in (
        {"variants": [{"name": "local", "method": "fedavg"}]},
        {"variants": [{"name": "x", "method": "fedavg", "regimes": ["nope"]}]},
        {"ablations": [{"name": "y", "regimes": ["nope"]}]},
    ):
        spec_path.write_text(yaml.safe_dump({**spec, **bad}))
        with pytest.raises(ConfigError, match="local|nope"):
            load_spec(spec_path)


def test_spec_names_that_name_cell_folders_must_be_file_names(tmp_path):
    from fedoap.errors import FedoapError, UnsafeNameError
    from fedoap.fileio import SAFE_NAME_RULE

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_config().to_dict()))
    spec_path = tmp_path / "spec.yaml"
    rule = f"cannot be part of a file name; use {SAFE_NAME_RULE}"
    # Before: cells/fedoap-../../../x-seed0-<digest> was a folder three levels above OUT/cells,
    # and figures/.. put a regime's figures in RESULTS itself.
    for spec, what, value in (
        (
            {"base": "base.yaml", "ablations": [{"name": "../../../x"}]},
            "ablation name",
            "../../../x",
        ),
        ({"regimes": [{"name": "..", "base": "base.yaml"}]}, "regime", ".."),
        ({"regimes": [{"name": "-rf", "base": "base.yaml"}]}, "regime", "-rf"),
    ):
        spec_path.write_text(yaml.safe_dump({"methods": ["fedoap"], **spec}))
        with pytest.raises(UnsafeNameError) as err:
            load_spec(spec_path)
        assert str(err.value) == f"{spec_path}: {what} {value!r} {rule}"
    # A variant's name is checked by the same rule, among the variants' other checks.
    bad = {"base": "base.yaml", "variants": [{"name": ".x", "method": "fedoap"}]}
    spec_path.write_text(yaml.safe_dump(bad))
    with pytest.raises(FedoapError, match=r"variants: names must be distinct words .* got '.x'"):
        load_spec(spec_path)
    # The names the committed specs use pass.
    ok = {
        "regimes": [{"name": "cases-02", "base": "base.yaml"}],
        "variants": [{"name": "fedoap+sg", "method": "fedoap"}],
        "ablations": [{"name": "no_pbl"}, {"name": "ft-long"}],
    }
    spec_path.write_text(yaml.safe_dump(ok))
    bspec, bases = load_spec(spec_path)
    assert all("/" not in c.key for c in plan(bspec, bases, seeds=[0]))


def test_csv_cells_a_spreadsheet_would_run_are_written_as_text(tmp_path):
    from fedoap.bench.results import RESULT_FIELDS, _write_csv

    # Before: a client named =HYPERLINK(...) went into results.csv as it is, a formula.
    formulas = ['=HYPERLINK("http://x.test","y")', "+cmd", "-2+3", "@SUM(A1)", "\tx", "\rx"]
    rows = [
        {"kind": "main", "variant": "fedoap", "client": c, "test_dice": -0.5, "seed": -1}
        for c in formulas
    ]
    numbers = ["-0.5", "-1e-05", "+3", "-inf", "-nan", "-.25"]
    rows += [{"client": "ok", "val_curve": n, "diverged": "- not a number"} for n in numbers]
    path = tmp_path / "results.csv"
    _write_csv(path, RESULT_FIELDS, rows)
    with open(path, newline="") as fh:
        back = list(csv.DictReader(fh))
    assert [r["client"] for r in back[: len(formulas)]] == ["'" + c for c in formulas]
    # Numbers stay numbers, negative ones too; text is neutralised wherever it is.
    assert {(r["test_dice"], r["seed"]) for r in back[: len(formulas)]} == {("-0.5", "-1")}
    assert [r["val_curve"] for r in back[len(formulas) :]] == numbers
    assert {r["diverged"] for r in back[len(formulas) :]} == {"'- not a number"}
    assert back[0]["variant"] == "fedoap"
