"""Loading a real client with and without the preprocessed cache (fedoap.data.cache).

LGG (3,929 slices at 128x128) letterboxed to 96x96, as configs/federation4.yaml does: one cold
load (read, check, letterbox, store) into an empty cache folder, then three loads from the cache.

    python benchmarks/data/cache_speed.py [../shared/data]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from fedoap.config import ClientSpec, DataConfig
from fedoap.data.dataset import load_raw

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    data = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data"
    spec = ClientSpec(name="brain_mri", path="lgg_brain_mri.npz")
    with tempfile.TemporaryDirectory() as cache:
        cfg = DataConfig(root=str(data), image_size=96, cache_dir=cache)
        t0 = time.perf_counter()
        load_raw(spec, cfg)
        print(f"cold (letterbox + store): {time.perf_counter() - t0:.2f} s")
        for i in range(3):
            t0 = time.perf_counter()
            load_raw(spec, cfg)
            print(f"from the cache {i + 1}: {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
