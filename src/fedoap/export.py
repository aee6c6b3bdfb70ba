"""``fedoap export``: a site's selected model as a stand-alone ONNX file, with a JSON sidecar.

The model is the one ``evaluate`` and ``predict`` score: the client's validation-selected
checkpoint with the K/V bank it was selected with, rebuilt by
:func:`fedoap.api.load_client_model`. It is exported on the CPU, in fp32, in eval mode and in
the contiguous memory format, whatever the run's ``train.*`` execution settings were; a K/V bank
(``model.kv.mode=bank``) becomes a constant of the graph.

The exporter is torch's own (``torch.onnx.export(dynamo=True)``, the default in torch 2.13; it
needs ``onnxscript``). The legacy TorchScript exporter (``dynamo=False``) also gives a correct
model, but torch 2.13 deprecates it and it warns while tracing this model; and
``torch.jit.trace``/``torch.jit.save`` (a TorchScript format) are deprecated too, so ONNX is the
one format. Before anything is written, the exported graph is run with onnxruntime on random
inputs and compared with the PyTorch model; a mismatch is an error, and the difference found is
recorded in the sidecar.

``OUT`` and ``OUT.json`` (the sidecar) are written atomically, model first; an existing one is
replaced only with ``force``. This module imports neither torch nor the ONNX packages until an
export runs, so the command line checks its arguments first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedoap.config import VOLUME_SOURCES, ClientSpec, ConfigError
from fedoap.errors import FedoapError, NotFoundError, OutputError
from fedoap.fileio import atomic_write_bytes, atomic_write_text, check_output_dir
from fedoap.runs import RunDir
from fedoap.version import fedoap_version

if TYPE_CHECKING:
    import torch

#: Formats ``fedoap export --format`` writes.
FORMATS = ("onnx",)
#: ONNX opset of the exported graph: the one torch 2.13's exporter (onnxscript's torchlib)
#: writes natively, so no version conversion runs; LayerNormalization needs 17 or later.
OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
#: The packages an ONNX export needs: the exporter, the checker, and the runtime that verifies.
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INSTALL_HINT = 'pip install -e ".[onnx]"'
#: Largest |ONNX - PyTorch| difference (plus the same, relative to the largest logit) the
#: export's own check accepts; fp32 runs of this model agree to about 1e-6.
VERIFY_ATOL = 1e-4
#: Random inputs the export's own check runs (batch sizes: the batch dimension is dynamic).
VERIFY_BATCHES = (1, 3)
#: What a protocol buffer, so a single-file ONNX model, can hold.
PROTOBUF_LIMIT = 2**31 - 1


class ExportError(FedoapError, RuntimeError):
    """An export cannot run (a missing package) or produced a model that fails its check."""


@dataclass(frozen=True)
class ExportResult:
    model: Path
    sidecar: Path
    info: dict[str, Any]  # what the sidecar holds


def sidecar_path(out: Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    return out.with_name(out.name + ".json")


def check_format(fmt: str) -> str:
    f = fmt.strip().lower()
    if f not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not supported; formats: {', '.join(FORMATS)}")
    return f


def check_target(out: Path, fmt: str = "onnx", force: bool = False) -> None:
    """Raise before any work when the format is unknown, or ``out`` or its sidecar cannot be
    written: its folder cannot be created or written, it is a folder, or it exists and ``force``
    is off. Reads nothing and imports nothing heavy."""
    check_format(fmt)
    out = Path(out)
    check_output_dir(out.parent, "-o")
    for p in (out, sidecar_path(out)):
        if os.path.isdir(p):
            raise OutputError(f"-o {out}: {p} is a folder")
        if os.path.lexists(p) and not force:
            raise OutputError(
                f"{p} already exists; pass --force to replace it, or choose another -o"
            )


def require_onnx() -> dict[str, str]:
    """Import the ONNX packages; their versions, or :class:`ExportError` naming the extra."""
    import importlib

    versions = {}
    for name in ONNX_PACKAGES:
        try:
            mod = importlib.import_module(name)
        except ImportError as err:
            raise ExportError(
                f"ONNX export needs {', '.join(ONNX_PACKAGES)} (the [onnx] extra): "
                f"{INSTALL_HINT} ({err})"
            ) from None
        versions[name] = str(getattr(mod, "__version__", "unknown"))
    return versions


def export_model(
    run_dir: Path, client: str, out: Path, fmt: str = "onnx", force: bool = False
) -> ExportResult:
    """Export ``client``'s selected model of the finished run in ``run_dir`` to ``out`` (ONNX)
    and describe it in ``out + ".json"``; see the module docstring."""
    fmt = check_format(fmt)
    out = Path(out)
    check_target(out, fmt, force)
    versions = require_onnx()
    rd = RunDir(Path(run_dir))
    if not rd.config.is_file():
        raise NotFoundError(f"{rd.config} not found: {run_dir} is not a run folder")
    if not rd.is_complete():
        raise ConfigError(
            f"{run_dir} has not finished (no {rd.summary.name}): its selected models may still "
            f"change; finish it with fedoap run --resume {run_dir}"
        )

    import torch

    from fedoap.api import load_client_model
    from fedoap.data.dataset import image_normalization
    from fedoap.federation.state import selected_info

    cfg, model = load_client_model(rd.root, client, torch.device("cpu"))
    model = model.to(dtype=torch.float32, memory_format=torch.contiguous_format).eval()
    model.requires_grad_(False)
    size, channels = cfg.data.image_size, cfg.data.channels
    data = _export_onnx(model, channels, size)
    diff = _verify(data, model, channels, size)

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, data)
    selected = selected_info(rd, client)
    index = [c.name for c in cfg.data.clients].index(client)
    spec = cfg.data.clients[index]
    bank = model.kv_bank
    info: dict[str, Any] = {
        "format": fmt,
        "model": out.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", channels, size, size],
            "dtype": "float32",
            "layout": "NCHW",
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", 1, size, size],
            "dtype": "float32",
            "meaning": "tumour logit per pixel",
        },
        "precision": "fp32 (fedoap predict scores at the run's train.precision: "
        f"{cfg.train.precision})",
        "image_size": size,
        "channels": channels,
        "normalize": image_normalization(spec, cfg.data),
        "preprocessing": {
            "order": _preprocessing_steps(spec),
            "letterbox": {
                "function": "fedoap.data.transforms.letterbox",
                "keep_aspect": True,
                "scale": "image_size / max(H, W); the longer side becomes image_size",
                "new_size": "round(H * scale), round(W * scale), each at least 1",
                "resample": "bicubic",
                "pad": "zeros, centred: top = (image_size - new_h) // 2, "
                "left = (image_size - new_w) // 2",
            },
            "normalize": {
                "function": "fedoap.data.transforms.normalize",
                "zscore": "per image over all its pixels and channels: "
                "(x - mean) / max(std, 1e-6), std unbiased (ddof=1)",
                "unit": "uint8 images / 255; other dtypes unchanged (as float32)",
            },
        },
        "client_data": cfg.to_dict()["data"]["clients"][index],
        "threshold": {
            "logit": 0.0,
            "rule": "a pixel is tumour where logit > 0 (strictly), i.e. sigmoid(logit) > 0.5",
        },
        "postprocessing": "crop the letterbox padding and resize the mask back to (H, W) "
        "(fedoap.data.transforms.unletterbox: bilinear, then >= 0.5)",
        "run": rd.root.resolve().name,
        "config_digest": cfg.digest(),
        "method": cfg.method,
        "client": client,
        "best_round": selected.get("best_round"),
        "kv_bank": None if bank is None else {"tokens": int(bank.shape[0]), "in_graph": True},
        "opset": OPSET,
        "exporter": "torch.onnx.export(dynamo=True)",
        "fedoap_version": fedoap_version(),
        "torch_version": torch.__version__,
        "versions": versions,
        "verification": {
            "runtime": f"onnxruntime {versions['onnxruntime']} (CPUExecutionProvider)",
            "inputs": f"N(0, 1) images, batch sizes {list(VERIFY_BATCHES)}",
            "max_abs_diff": diff,
        },
    }
    side = sidecar_path(out)
    atomic_write_text(side, json.dumps(info, indent=2, allow_nan=False) + "\n")
    return ExportResult(out, side, info)


def _preprocessing_steps(spec: ClientSpec) -> list[str]:
    """How an input becomes the model's NCHW float32 batch, for this client's kind of data."""
    if spec.source in VOLUME_SOURCES:
        return [
            "read the NIfTI volume; take the client's channel (client_data.channel: a 4D "
            "image's 4th axis, or the nnU-Net file <case>_<XXXX> of that channel)",
            "normalise the whole volume (fedoap.data.volumes.normalise_volume, as "
            "client_data.volume says): CT clipped to the HU window and scaled to [0, 1]; MR "
            "clipped to the volume's percentiles, then z-scored over the volume",
            "cut it into 2D slices along client_data.volume.axis (null: the axis of coarsest "
            "spacing in the header, the last of equals)",
            "letterbox each slice to image_size x image_size; 'normalize' is 'unit': float "
            "slices pass unchanged",
            "to NCHW float32 (one channel, repeated to 3 when channels is 3)",
            "after the model: undo the letterbox per slice and stack the slices back along the "
            "same axis (fedoap predict writes that mask with the input's affine and header)",
        ]
    return [
        "read the image as (H, W) grayscale, or (H, W, 3) when channels is 3 "
        "(fedoap.data.sources.read_image, with the client's 'channel')",
        "letterbox it to image_size x image_size",
        "normalise the letterboxed image (padding included) as 'normalize' says",
        "to NCHW float32",
    ]


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence what torch 2.13's exporter says about itself, not about the model: a log line per
    torchvision operator it does not find, and a deprecation inside torch's pytree."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning
            )
            yield
    finally:
        logger.setLevel(level)


def _export_onnx(model: torch.nn.Module, channels: int, size: int) -> bytes:
    import onnx
    import torch

    # An example batch of 2: torch.export fixes a dimension whose example size is 1.
    example = torch.zeros(2, channels, size, size)
    batch = torch.export.Dim("batch")
    # An error here is torch's or fedoap's, not the user's: it keeps its traceback.
    with _quiet_exporter():
        program = torch.onnx.export(
            model,
            (example,),
            None,
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"x": {0: batch}},
            external_data=False,
            optimize=True,
            verbose=False,
        )
    assert program is not None
    proto = program.model_proto
    if proto.ByteSize() > PROTOBUF_LIMIT:
        raise ExportError(
            f"the model is {proto.ByteSize() / 2**30:.1f} GiB: more than one ONNX file can hold "
            "(2 GiB), and this export writes one file"
        )
    onnx.checker.check_model(proto, full_check=True)
    return bytes(proto.SerializeToString())


def _verify(data: bytes, model: torch.nn.Module, channels: int, size: int) -> float:
    """Run the ONNX bytes with onnxruntime beside ``model``; the largest |difference|."""
    import numpy as np
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for n in VERIFY_BATCHES:
        x = torch.randn(n, channels, size, size, generator=gen)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        if got.shape != ref.shape:
            raise ExportError(f"the exported model returns {got.shape}, PyTorch {ref.shape}")
        diff = float(np.abs(got - ref).max())
        worst = max(worst, diff)
        if not diff <= VERIFY_ATOL * (1.0 + float(np.abs(ref).max())):
            raise ExportError(
                f"the exported model differs from PyTorch by up to {diff:.3g} on a random batch "
                f"of {n}; nothing was written"
            )
    return worst
