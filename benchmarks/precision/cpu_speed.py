"""Training images/s of the quickstart's model on this CPU, per autocast precision.

The quickstart network (configs/quickstart.yaml: w=8, depth 4, 64x64, batch 16) trains one epoch
of 160 random images through fedoap's training loop in fp32, bf16 and fp16, after one warm-up
epoch each. It also prints whether the CPU has native bf16 (AVX512-BF16 or AMX): without it,
autocast emulates bf16 and is slower than fp32.

    python benchmarks/precision/cpu_speed.py
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
import torch

from fedoap.algorithms import build_algorithm
from fedoap.config import load_config
from fedoap.data.dataset import Split
from fedoap.training import make_generator, train_epochs
from fedoap.training.device import native_low_precision

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    n, size = 160, cfg.data.image_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, size, size, generator=gen)
    y = (torch.rand(n, 1, size, size, generator=gen) > 0.9).float()
    data = Split(x, y, np.arange(n).astype(str), np.arange(n).astype(str))
    cpu = torch.device("cpu")
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    for precision in ("fp32", "bf16", "fp16"):
        alg = build_algorithm(cfg)
        model = alg.build_model()
        opt = alg.make_optimizer(list(model.parameters()), None)
        loss = alg.loss("fit")
        args = (loss, make_generator(0, precision), cfg.train.batch_size, precision)
        train_epochs(model, opt, data, 1, *args)  # warm-up
        t0 = time.perf_counter()
        train_epochs(model, opt, data, 1, *args)
        rate = n / (time.perf_counter() - t0)
        native = native_low_precision(precision, cpu)
        print(f"{precision}: {rate:.0f} images/s (native on this CPU: {native})", flush=True)


if __name__ == "__main__":
    main()
