"""What the privacy benchmark's per-image budgets guarantee each patient (group privacy).

DP-SGD here is per training image. A case (patient, or colonoscopy video) with k training images
has, by the basic group-privacy bound, (k epsilon, k e^((k-1) epsilon) delta): see
``fedoap.privacy.group_privacy``. Runs made since that reading entered ``summary.json``
(``privacy.clients.<name>.patient_level``) carry it; this recomputes it for the committed cells of
a results folder from their spent (epsilon, delta) and the largest training case of each site,
read from the cell's own config through the same data pipeline, and prints one table.

    python benchmarks/analysis/patient_level.py benchmarks/results/privacy
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from fedoap.config import load_config
from fedoap.data import prepare_clients
from fedoap.privacy import group_privacy, largest_case


def largest_cases(config: Path) -> dict[str, int]:
    """Each site's largest number of training images in one case, for the run's ``config``."""
    cfg = load_config(config)
    return {c.name: largest_case(c.train.case_ids) for c in prepare_clients(cfg.data)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="a bench results folder (with cells/)")
    args = ap.parse_args()
    rows: dict[tuple[str, str, int], list[tuple[float, float]]] = defaultdict(list)
    sizes: dict[str, dict[str, int]] = {}  # data spec digest -> site -> k
    for cell in sorted((args.results / "cells").iterdir()):
        summary = cell / "run" / "summary.json"
        if not summary.is_file():
            continue
        spent = json.loads(summary.read_text()).get("privacy", {}).get("clients", {})
        if not spent:
            continue
        config = cell / "run" / "config.yaml"
        key = repr(load_config(config).data)  # the data spec: splits and caps
        if key not in sizes:
            sizes[key] = largest_cases(config)
        regime = cell.name.split("-seed")[0].rsplit("-", 1)[0]
        for site, p in spent.items():
            rows[(regime, site, sizes[key][site])].append((p["epsilon"], p["delta"]))
    print("| regime | site | largest case (images) | ε per image | ε per patient | δ per patient |")
    print("|---|---|---|---|---|---|")
    for (regime, site, k), spent_list in sorted(rows.items()):
        eps = max(e for e, _ in spent_list)  # the worst cell of the regime (they agree to 1e-2)
        delta = max(d for _, d in spent_list)
        g = group_privacy(eps, delta, k)
        d = f"{g['delta']:.2g}" if g["meaningful"] else "≥ 1: none"
        print(f"| {regime} | {site} | {k} | {eps:.2f} | {g['epsilon']:.1f} | {d} |")


if __name__ == "__main__":
    main()
