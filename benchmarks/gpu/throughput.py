"""Training throughput through fedoap's real loop, beside the bare model + optimiser ceiling.

For each setting (width, image size, batch, compile mode) on one real client's training split:

* **real**: ``Algorithm.train`` -- fedoap's loop as a run uses it: batches drawn on the device,
  augmentation (flips, rotation, intensity; switched on here so that its cost is counted), the
  segmentation loss, AdamW (fused on CUDA), the mean loss read back once per call;
* **bare**: the same compiled (or eager) module and optimiser on one random batch that stays put:
  ``model(x)``, ``square().mean()``, backward, step. The ceiling for the real loop.

Both run in the same process on the same module, so a compiled mode is compiled once and its
warm-up (first call) is reported separately. Images/s count training images; TFLOP/s count 3x the
forward FLOPs (forward + backward).

    PYTHONPATH=src python benchmarks/gpu/throughput.py --data DATA_DIR --out results.json

``--quick`` shrinks everything for a CPU dry run of the script (numbers meaningless).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from fedoap.algorithms import build_algorithm
from fedoap.algorithms.base import FitContext
from fedoap.config import load_config
from fedoap.data.dataset import make_client
from fedoap.training.device import autocast, describe, place, session, setup, sync
from fedoap.training.engine import step_begin

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    width: int
    size: int
    batch: int
    mode: str  # eager | default | reduce-overhead | max-autotune-no-cudagraphs
    client: str = "brain_mri"  # 2,750 training images; colon_cvc has 430
    precision: str = "bf16"
    channels_last: bool | None = None  # None: the project's default for the device
    max_images: int | None = None  # cap on the training split (None: all of it)


PAPER = [
    Setting("w64-128-b64-eager", 64, 128, 64, "eager"),
    Setting("w64-128-b64-compiled", 64, 128, 64, "default"),
]
# The CPU profile (configs/federation4.yaml) on a small client: launch-bound on a GPU.
SMALL = [
    Setting("w8-96-b8-eager", 8, 96, 8, "eager", client="colon_cvc"),
    Setting("w8-96-b8-reduce-overhead", 8, 96, 8, "reduce-overhead", client="colon_cvc"),
    Setting("w8-96-b64-eager", 8, 96, 64, "eager", client="colon_cvc"),
]
EXTRA = [
    Setting("w64-128-b64-compiled-nchw", 64, 128, 64, "default", channels_last=False),
    Setting("w8-96-b64-reduce-overhead", 8, 96, 64, "reduce-overhead", client="colon_cvc"),
]
QUICK = [
    Setting("quick-eager", 4, 32, 8, "eager", client="colon_cvc", max_images=64),
    Setting("quick-compiled", 4, 32, 8, "default", client="colon_cvc", max_images=16),
]


def config_for(s: Setting, data: Path, client: str, device: str) -> Any:
    overrides = [
        f"data.root={data}",
        f"data.clients=[{{name: {client}, path: {client}.npz}}]",
        f"data.image_size={s.size}",
        f"data.max_train_images={'null' if s.max_images is None else s.max_images}",
        "data.augment.enabled=true",
        f"model.width={s.width}",
        f"train.batch_size={s.batch}",
        f"train.precision={s.precision}",
        f"train.device={device}",
        f"train.compile={str(s.mode != 'eager').lower()}",
    ]
    if s.mode != "eager":
        overrides.append(f"train.compile_mode={s.mode}")
    if s.channels_last is not None:
        overrides.append(f"train.channels_last={str(s.channels_last).lower()}")
    return load_config(ROOT / "configs" / "paper.yaml", overrides)


def measure(s: Setting, data: Path, device: str, epochs: int) -> dict[str, Any]:
    client = s.client
    cfg = config_for(s, data, client, device)
    dev = setup(cfg.train)
    with session(cfg.train, dev):
        alg = build_algorithm(cfg)
        model = alg.build_model()
        flops = model.flops_per_image(s.size)
        place(model, cfg.train, dev)
        split = make_client(cfg.data.clients[0], cfg.data).to(dev).train
        opt = alg.make_optimizer(list(model.parameters()), None)
        ctx = FitContext(client, 1, 0, device=dev)
        loss_fn = alg.loss("fit")

        # real: one epoch to warm up (compiles; cuDNN autotunes), then timed epochs
        t0 = time.perf_counter()
        alg.train(model, opt, split, 1, loss_fn, ctx.generator("warm"), ctx)
        sync(dev)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        alg.train(model, opt, split, epochs, loss_fn, ctx.generator("timed"), ctx)
        sync(dev)
        real_s = time.perf_counter() - t0
        images = len(split) * epochs

        # bare: the same module and optimiser, one resident random batch
        gen = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(s.batch, 1, s.size, s.size, generator=gen, device=dev)
        steps = max(1, images // s.batch)

        def bare_step() -> None:
            step_begin(x)
            with autocast(s.precision, dev.type):
                out = model(x)
            loss = out.float().square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(5):
            bare_step()
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            bare_step()
        sync(dev)
        bare_s = time.perf_counter() - t0
    real = images / real_s
    bare = steps * s.batch / bare_s
    out = {
        **dataclasses.asdict(s),
        "train_images": len(split),
        "timed_epochs": epochs,
        "real_images_per_s": round(real, 1),
        "bare_images_per_s": round(bare, 1),
        "real_over_bare": round(real / bare, 3),
        "warm_up_s": round(warm, 2),
        "forward_gflop_per_image": round(flops / 1e9, 3),
        "real_tflop_per_s": round(3 * flops * real / 1e12, 1),
        "bare_tflop_per_s": round(3 * flops * bare / 1e12, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        if dev.type == "cuda"
        else None,
    }
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="prepared data folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per setting")
    ap.add_argument("--sets", default="paper,small", help="paper, small, extra and/or quick")
    args = ap.parse_args()
    groups = {"paper": PAPER, "small": SMALL, "extra": EXTRA, "quick": QUICK}
    settings = [s for g in args.sets.split(",") for s in groups[g]]
    dev = setup(load_config(ROOT / "configs" / "paper.yaml", [f"train.device={args.device}"]).train)
    results = {
        "machine": {**describe(dev), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
        "settings": [],
    }
    for s in settings:
        try:
            results["settings"].append(measure(s, args.data, args.device, args.epochs))
        except Exception as err:  # one failing setting must not lose the others' numbers
            results["settings"].append({**dataclasses.asdict(s), "error": repr(err)[:2000]})
            print(f"{s.name} failed: {err!r}", flush=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
