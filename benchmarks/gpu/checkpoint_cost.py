"""What one resume checkpoint costs at the paper's scale (configs/paper.yaml: 4 clients, w=64).

Builds the tensors a FedOAP ``last.safetensors`` holds after a round -- the global shared
weights, and per client its personal weights, its best model and AdamW's two moments -- from a
freshly initialised model, and times ``save_tensors`` (digest + atomic write + fsync) three
times, the SHA-256 digest alone, and ``load_tensors`` (read + digest check) once.

    python benchmarks/gpu/checkpoint_cost.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from fedoap.algorithms import build_algorithm
from fedoap.config import load_config
from fedoap.federation.checkpoint import digest, load_tensors, save_tensors

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    cfg = load_config(ROOT / "configs" / "paper.yaml")
    alg = build_algorithm(cfg)
    model = alg.build_model()
    state = model.state_dict()
    personal = set(alg.partition(model).personal)
    tensors = {f"global/{k}": v.clone() for k, v in state.items() if k not in personal}
    for c in range(len(cfg.data.clients)):
        tensors.update({f"client/{c}/personal/{k}": state[k].clone() for k in personal})
        tensors.update({f"client/{c}/best/{k}": v.clone() for k, v in state.items()})
        for moment in ("exp_avg", "exp_avg_sq"):
            tensors.update({f"client/{c}/optim/{moment}/{k}": v.clone() for k, v in state.items()})
    size = sum(v.numel() * v.element_size() for v in tensors.values())
    print(f"{sum(v.numel() for v in state.values()):,} parameters; checkpoint {size / 1e9:.2f} GB")
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        path = Path(tmp) / "last.safetensors"
        for i in range(3):
            t0 = time.perf_counter()
            save_tensors(path, tensors, {"round": i})
            print(f"save {i + 1}: {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        digest(tensors, "{}")
        took = time.perf_counter() - t0
        print(f"digest alone: {took:.1f} s ({size / 1e9 / took:.2f} GB/s)")
        t0 = time.perf_counter()
        load_tensors(path)
        print(f"load + verify: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
