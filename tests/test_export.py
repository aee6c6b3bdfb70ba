"""``fedoap export``: the ONNX model computes what the PyTorch model computes (onnxruntime vs
torch, on random inputs of the declared size), its sidecar describes it, and the command refuses
what it should."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedoap.api import load_client_model, run_experiment
from fedoap.cli.main import app
from fedoap.config import ConfigError, load_config
from fedoap.errors import NotFoundError, OutputError
from fedoap.export import OPSET, ExportError, export_model, sidecar_path
from tests.conftest import tiny_config

needs_onnx = pytest.mark.skipif(
    not all(find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript")),
    reason='needs the [onnx] extra: pip install -e ".[onnx]"',
)

#: One fp32 round, no fine-tuning: a few seconds per run.
FAST = ("federation.rounds=1", "finetune.epochs=0", "train.precision=fp32")
CASES = {
    "fedoap-weights": ("method=fedoap", "model.kv.mode=weights"),
    "fedoap-bank": ("method=fedoap", "model.kv.mode=bank"),
    # Batch norm (running statistics in eval mode) and weights placed channels_last: the export
    # still sees a plain fp32 eval-mode model.
    "fedavg": ("method=fedavg", "model.norm=batch", "train.channels_last=true"),
}
TOL = 1e-4

cli = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-runs")
    out = {}
    for name, over in CASES.items():
        cfg = tiny_config(*FAST, *over)
        run_experiment(cfg, root / name, progress=False)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def exported(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each run's ``us`` model, exported once through the Python entry point."""
    if not all(find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript")):
        pytest.skip('needs the [onnx] extra: pip install -e ".[onnx]"')
    root = tmp_path_factory.mktemp("exported")
    out = {}
    for name, run in runs.items():
        result = export_model(run, "us", root / f"{name}.onnx")
        assert result.model == root / f"{name}.onnx"
        assert result.sidecar == root / f"{name}.onnx.json"
        out[name] = result.model
    return out


def ort_logits(path: Path, *xs: torch.Tensor) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [np.asarray(sess.run(["logits"], {"image": x.numpy()})[0]) for x in xs]


def torch_logits(run: Path, client: str, *xs: torch.Tensor) -> list[np.ndarray]:
    _, model = load_client_model(run, client, torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        return [model(x).numpy() for x in xs]


def random_inputs(run: Path) -> list[torch.Tensor]:
    cfg = load_config(run / "config.yaml")
    c, s = cfg.data.channels, cfg.data.image_size
    gen = torch.Generator().manual_seed(123)
    return [torch.randn(n, c, s, s, generator=gen) * scale for n, scale in ((1, 1), (4, 1), (2, 3))]


@needs_onnx
@pytest.mark.parametrize("case", list(CASES))
def test_onnx_equals_torch(case, runs, exported):
    xs = random_inputs(runs[case])
    worst = 0.0
    for x, got, ref in zip(
        xs, ort_logits(exported[case], *xs), torch_logits(runs[case], "us", *xs), strict=True
    ):
        assert got.shape == ref.shape == (x.shape[0], 1, *x.shape[2:])
        worst = max(worst, float(np.abs(got - ref).max()))
    print(f"{case}: max |onnxruntime - torch| = {worst:.3g}")
    assert worst <= TOL
    # The numbers are not trivially equal: the model's logits vary across pixels and inputs.
    assert float(np.std(ref)) > 1e-3


@needs_onnx
def test_kv_bank_is_in_the_graph(runs, exported):
    run = runs["fedoap-bank"]
    _, model = load_client_model(run, "us", torch.device("cpu"))
    assert model.kv_bank is not None and model.kv_bank.shape[0] > 0
    rows = int(model.kv_bank.shape[0])
    x = random_inputs(run)[1]
    model.eval()
    with torch.no_grad():
        with_bank = model(x).numpy()
        model.set_kv_bank(None)
        without_bank = model(x).numpy()
    (got,) = ort_logits(exported["fedoap-bank"], x)
    matched, effect = np.abs(got - with_bank).max(), np.abs(got - without_bank).max()
    print(f"bank: |onnx - torch| = {matched:.3g}, |onnx - torch without the bank| = {effect:.3g}")
    assert matched <= TOL
    # The bank changes the logits, so the match above says the exported graph carries it.
    assert effect > 10 * TOL
    meta = json.loads(sidecar_path(exported["fedoap-bank"]).read_text())
    assert meta["kv_bank"] == {"tokens": rows, "in_graph": True}
    assert json.loads(sidecar_path(exported["fedoap-weights"]).read_text())["kv_bank"] is None


@needs_onnx
def test_sidecar_describes_the_model(runs, exported):
    import onnx

    run, path = runs["fedoap-weights"], exported["fedoap-weights"]
    cfg = load_config(run / "config.yaml")
    meta = json.loads(sidecar_path(path).read_text())
    data = path.read_bytes()
    assert meta["sha256"] == hashlib.sha256(data).hexdigest() and meta["bytes"] == len(data)
    assert meta["config_digest"] == cfg.digest()
    assert meta["method"] == "fedoap" and meta["client"] == "us"
    summary = json.loads((run / "summary.json").read_text())
    assert meta["best_round"] == summary["clients"]["us"]["best_round"] == 1
    s, c = cfg.data.image_size, cfg.data.channels
    assert meta["image_size"] == s == 32 and meta["channels"] == c == 1
    assert meta["input"] == {
        "name": "image",
        "shape": ["batch", c, s, s],
        "dtype": "float32",
        "layout": "NCHW",
    }
    assert meta["output"]["name"] == "logits" and meta["output"]["shape"] == ["batch", 1, s, s]
    assert meta["normalize"] == cfg.data.normalize == "zscore"
    assert meta["client_data"] == cfg.to_dict()["data"]["clients"][1]
    assert meta["client_data"]["name"] == "us"
    assert meta["threshold"]["logit"] == 0.0 and "logit > 0" in meta["threshold"]["rule"]
    assert meta["preprocessing"]["letterbox"]["function"] == "fedoap.data.transforms.letterbox"
    assert meta["opset"] == OPSET >= 17
    assert meta["torch_version"] == torch.__version__
    assert meta["fedoap_version"]
    assert 0 <= meta["verification"]["max_abs_diff"] <= TOL
    # The file says the same as the sidecar.
    model = onnx.load_from_string(data)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    (inp,) = model.graph.input
    (outp,) = model.graph.output
    assert inp.name == "image" and outp.name == "logits"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", c, s, s]


@needs_onnx
def test_export_refuses_what_it_should(runs, tmp_path):
    run = runs["fedavg"]
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep")
    with pytest.raises(OutputError, match="already exists.*--force"):
        export_model(run, "mri", out)
    assert out.read_bytes() == b"keep"
    out.unlink()
    sidecar_path(out).write_text("{}")  # a sidecar alone is not replaced silently either
    with pytest.raises(OutputError, match=r"m\.onnx\.json already exists"):
        export_model(run, "mri", out)
    sidecar_path(out).unlink()
    with pytest.raises(ConfigError, match="client 'nope' is not in .*clients: mri, us, ct"):
        export_model(run, "nope", out)
    with pytest.raises(ConfigError, match="--format 'tflite' is not supported; formats: onnx"):
        export_model(run, "mri", out, fmt="tflite")
    with pytest.raises(NotFoundError, match="not a run folder"):
        export_model(tmp_path / "nothing", "mri", out)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / "summary.json").unlink()
    with pytest.raises(ConfigError, match="has not finished"):
        export_model(unfinished, "mri", out)
    assert not out.exists() and not sidecar_path(out).exists()


def test_missing_extra_names_it(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript -> ImportError
    with pytest.raises(ExportError, match=r'pip install -e "\.\[onnx\]"'):
        export_model(runs["fedavg"], "mri", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@needs_onnx
def test_cli_export_end_to_end(runs, tmp_path):
    run = runs["fedavg"]
    out = tmp_path / "sub" / "model.onnx"
    args = ["export", str(run), "--client", "ct", "-o", str(out)]
    bad = cli.invoke(app, [*args[:-1], str(tmp_path / "x.onnx"), "--format", "tflite"])
    assert bad.exit_code == 2 and "formats: onnx" in bad.output
    unknown = cli.invoke(app, ["export", str(run), "--client", "nope", "-o", str(tmp_path / "y")])
    assert unknown.exit_code == 2 and "client 'nope'" in unknown.output
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y").exists()

    out.parent.mkdir()
    out.write_bytes(b"stale")
    refused = cli.invoke(app, args)
    assert refused.exit_code == 2, refused.output
    assert "already exists" in refused.output and "--force" in refused.output
    assert out.read_bytes() == b"stale" and not sidecar_path(out).exists()

    res = cli.invoke(app, [*args, "--force"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "model.onnx.json" in res.output
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["client"] == "ct" and meta["method"] == "fedavg"
    assert meta["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    xs = random_inputs(run)
    for got, ref in zip(ort_logits(out, *xs), torch_logits(run, "ct", *xs), strict=True):
        assert np.abs(got - ref).max() <= TOL
