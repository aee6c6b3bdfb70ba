"""Where do the selected models come from, and were the curves still rising at the end?

Reads the main-matrix cells of a benchmark folder (their ``run/metrics.csv`` and
``run/summary.json``, validation numbers only) and prints, per method: the share of clients whose
selected model comes from the fine-tuning stage, the mean selected round, the mean validation
Dice at the last federated round, at the selected round, and the share of (seed, client) pairs
whose validation Dice was best in the last two steps (a sign that more budget would help).

    python benchmarks/analysis/selection.py benchmarks/results/federation4 [method ...]
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def main(root: Path, methods: list[str]) -> None:
    stats: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for cell in sorted((root / "cells").iterdir()):
        meta_path, summ_path = cell / "cell.json", cell / "run" / "summary.json"
        if not (meta_path.is_file() and summ_path.is_file()):
            continue
        meta = json.loads(meta_path.read_text())
        if meta.get("kind") != "main" or (methods and meta.get("method") not in methods):
            continue
        summary = json.loads(summ_path.read_text())
        rounds = summary["time"]["rounds"]
        with open(cell / "run" / "metrics.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        last_step = max(int(r["round"]) for r in rows)
        s = stats[summary["method"]]
        for name, c in summary["clients"].items():
            mine = {int(r["round"]): float(r["val_dice"]) for r in rows if r["client"] == name}
            s["from_finetune"].append(float(c["best_round"] > rounds))
            s["best_round"].append(c["best_round"])
            s["val_last_federated"].append(mine[rounds])
            s["val_selected"].append(c["val"]["dice"])
            s["best_in_last_two"].append(float(c["best_round"] >= last_step - 1))
            s["test_dice"].append(c["test"]["dice"])
    cols = list(next(iter(stats.values())).keys()) if stats else []
    print("| method | n | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for method, s in sorted(stats.items(), key=lambda kv: -np.mean(kv[1]["test_dice"])):
        vals = " | ".join(f"{np.mean(s[c]):.2f}" for c in cols)
        print(f"| {method} | {len(s['test_dice'])} | {vals} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
