"""The ``fedoap`` command line: errors are clear and touch nothing; a run prints its table."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from fedoap.cli.main import app
from tests.conftest import REPO, tiny_config

cli = CliRunner()


def write_cfg(tmp_path, cfg=None, **raw):
    p = tmp_path / "cfg.yaml"
    data = (cfg or tiny_config("federation.rounds=1", "finetune.epochs=0")).to_dict()
    data.update(raw)
    p.write_text(yaml.safe_dump(data))
    return p


def test_run_prints_the_per_client_table(tmp_path):
    cfg = write_cfg(tmp_path)
    res = cli.invoke(app, ["run", "-c", str(cfg), "-o", str(tmp_path / "run"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "test metrics per client" in res.output
    for name in ("mri", "us", "ct", "mean"):
        assert name in res.output
    again = cli.invoke(app, ["run", "-c", str(cfg), "-o", str(tmp_path / "run"), "--quiet"])
    assert again.exit_code == 2 and "already exists" in again.output


def test_bad_override_fails_before_anything_is_created(tmp_path):
    cfg = write_cfg(tmp_path)
    out = tmp_path / "run"
    res = cli.invoke(app, ["run", "-c", str(cfg), "-o", str(out), "train.lr=abc"])
    assert res.exit_code == 2
    assert "train.lr: expected a number" in res.output
    assert not out.exists()


def test_bad_data_fails_before_the_run_folder_is_created(tmp_path):
    arr = np.zeros((8, 16, 16), np.uint8)
    np.savez(tmp_path / "bad.npz", images=arr, masks=np.zeros((8, 8, 8), np.uint8))
    data = tiny_config().to_dict()["data"]
    data["root"] = str(tmp_path)
    data["clients"].append({"name": "bad", "source": "npz", "path": "bad.npz"})
    cfg = write_cfg(tmp_path, data=data)
    out = tmp_path / "run"
    res = cli.invoke(app, ["run", "-c", str(cfg), "-o", str(out)])
    assert res.exit_code == 2
    assert (
        "client 'bad'" in res.output and "bad.npz" in res.output and "does not match" in res.output
    )
    assert not out.exists()


def test_unknown_method_lists_known(tmp_path):
    res = cli.invoke(
        app, ["run", "-c", str(write_cfg(tmp_path)), "-o", str(tmp_path / "r"), "method=nope"]
    )
    assert res.exit_code == 2 and "known:" in res.output and "fedoap" in res.output


def test_resume_of_missing_folder(tmp_path):
    res = cli.invoke(app, ["run", "--resume", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "not a run folder" in res.output


def test_multi_value_options_accept_space_and_comma_lists():
    from fedoap.cli.main import expand_multi_value

    argv = ["bench", "-c", "b.yaml", "--seeds", "0", "1", "2", "--methods", "fedoap,local", "-j"]
    argv.append("2")
    assert expand_multi_value(argv) == [
        "bench", "-c", "b.yaml",
        "--seeds", "0", "--seeds", "1", "--seeds", "2",
        "--methods", "fedoap", "--methods", "local",
        "-j", "2",
    ]  # fmt: skip
    # A trailing option without values is left for click to reject.
    assert expand_multi_value(["bench", "--only"]) == ["bench", "--only"]
    # --variants takes several values the same way; --variant, its earlier spelling, too.
    assert expand_multi_value(["bench", "--variants", "fedoap", "fedoap.median.*"]) == [
        "bench", "--variants", "fedoap", "--variants", "fedoap.median.*",
    ]  # fmt: skip
    assert expand_multi_value(["--variant", "a", "--variant", "b,c"]) == [
        "--variant", "a", "--variant", "b", "--variant", "c",
    ]  # fmt: skip


def test_bench_variants_take_several_values_and_the_old_repeated_form(tmp_path, capsys):
    from fedoap.cli.main import main

    spec = tmp_path / "b.yaml"
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_config().to_dict()))
    methods = ["local", "fedavg", "fedprox"]
    spec.write_text(yaml.safe_dump({"base": "base.yaml", "methods": methods, "seeds": [0]}))
    listed = []
    for chosen in (
        ["--variants", "local", "fedavg"],
        ["--variant", "local", "--variant", "fedavg"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", "-c", str(spec), "-o", str(tmp_path / "o"), *chosen, "--dry-run"])
        assert exit_info.value.code == 0
        listed.append(capsys.readouterr().out)
    assert listed[0] == listed[1]
    assert "local-seed0-" in listed[0] and "fedavg-seed0-" in listed[0]
    assert "fedprox" not in listed[0]


def test_bench_dry_run_takes_space_separated_seeds(tmp_path, capsys):
    from fedoap.cli.main import main

    spec = tmp_path / "b.yaml"
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tiny_config().to_dict()))
    spec.write_text(yaml.safe_dump({"base": "base.yaml", "methods": ["local"], "seeds": [0]}))
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["bench", "-c", str(spec), "-o", str(tmp_path / "o"), "--seeds", "3", "4", "--dry-run"]
        )  # noqa: E501
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "local-seed3-" in out and "local-seed4-" in out and "seed0" not in out


def test_a_safeguarded_run_shows_what_each_site_kept(tmp_path):
    import json

    cfg = write_cfg(tmp_path, tiny_config("federation.rounds=1", "safeguard.mode=choose"))
    res = cli.invoke(app, ["run", "-c", str(cfg), "-o", str(tmp_path / "run"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "kept" in res.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for name, c in summary["clients"].items():
        line = next(ln for ln in res.output.splitlines() if f" {name} " in ln)
        assert c["safeguard"]["choice"] in line


def test_version_is_the_installed_packages_and_the_changelogs_latest():
    from importlib.metadata import version

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"fedoap {version('fedoap')}"
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert f"## {version('fedoap')} " in changelog  # every release has its entry
