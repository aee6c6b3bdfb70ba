from pathlib import Path

import pytest

from fedoap.algorithms import build_algorithm
from fedoap.config import Config, ConfigError, load_config, parse_override
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


SHIPPED_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
SHIPPED_SPECS = sorted((REPO / "benchmarks").glob("[!_]*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    build_algorithm(cfg)


@pytest.mark.parametrize("path", SHIPPED_SPECS, ids=lambda p: p.name)
def test_shipped_benchmark_specs_load_and_plan(path):
    from fedoap.bench import load_spec, plan

    spec, bases = load_spec(path)
    cells = plan(spec, bases)
    assert cells and len({c.key for c in cells}) == len(cells)  # one folder per cell
    for cell in cells:
        build_algorithm(cell.cfg)


def test_every_shipped_config_and_spec_is_found():
    assert len(SHIPPED_CONFIGS) >= 7 and len(SHIPPED_SPECS) >= 9


def test_dotted_overrides_apply_and_parse_types():
    cfg = load_config(
        REPO / "configs" / "quickstart.yaml",
        ["train.lr=3e-4", "model.kv.mode=bank", "finetune.pbl.region=band"],
    )
    assert cfg.train.lr == 3e-4
    assert cfg.model.kv.mode == "bank"
    assert cfg.finetune.pbl.region == "band"
    assert parse_override("a.b=true") == (["a", "b"], True)


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(
        ConfigError, match=r"unknown config key train\.learning_rate.*valid keys.*lr"
    ):
        load_config(REPO / "configs" / "quickstart.yaml", ["train.learning_rate=0.1"])


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method: fedavg\nmodell:\n  width: 8\n")
    with pytest.raises(ConfigError, match="unknown config key modell"):
        load_config(p)


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.lr=fast", "train.lr: expected a number"),
        ("train.batch_size=1.5", "train.batch_size: expected an integer"),
        ("model.use_dca=maybe", "model.use_dca: expected true/false"),
        ("finetune.pbl.region=edge", "finetune.pbl.region: must be one of"),
        ("train.precision=fp8", "train.precision: must be one of"),
        ("train.device=gpu", "train.device: must be auto, cpu, cuda, cuda:N or mps"),
        ("train.eval_batch_size=0", "train.eval_batch_size: must be >= 1"),
        ("data.split.train=0.9", "must sum to 1"),
        ("model.heads=3", "model.heads=3 must divide"),
        ("data.image_size=100", "multiple of 2\\^model.depth"),
    ],
)
def test_wrong_types_and_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(REPO / "configs" / "quickstart.yaml", [override])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(
        ConfigError, match="unknown method 'fedfoo'; known: .*fedavg.*fedoap.*local"
    ):
        build_algorithm(tiny_config("method=fedfoo"))


def test_unknown_algorithm_option_fails():
    with pytest.raises(ConfigError, match=r"unknown config key algorithm\.mu"):
        build_algorithm(tiny_config("algorithm.mu=0.1"))


def test_config_roundtrip_and_digest(tmp_path):
    cfg = tiny_config()
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    again = load_config(p)
    assert again == cfg and again.digest() == cfg.digest()
    assert tiny_config("seed=1").digest() != cfg.digest()
