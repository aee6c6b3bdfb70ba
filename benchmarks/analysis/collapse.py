"""Where do small sites' models collapse to predicting nothing, and which selection keeps them?

Reads the main cells of a results folder (``run/metrics.csv``, ``run/summary.json``) and its
``cases.csv``, and prints per (regime, variant):

* ``fed ok``: site-models whose validation case Dice at the last federated round is at least
  ``--ok`` (a model that segments something);
* ``ft collapse``: of those, the share whose case Dice falls below ``--empty`` at the first
  fine-tuning epoch (fine-tuning from a fresh optimiser destroyed them);
* ``from ft``: the share of selected models that come from the fine-tuning stage;
* ``empty``: the share of selected site-models that predict nothing on their whole test split
  (no positive pixel, from cases.csv).

    python benchmarks/analysis/collapse.py benchmarks/results/scarcity [--regime cases-02]
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--regime", action="append", help="only these regimes (repeatable)")
    ap.add_argument("--ok", type=float, default=0.2)
    ap.add_argument("--empty", type=float, default=0.05)
    args = ap.parse_args()
    empty_models: dict[tuple[str, str, int, str], bool] = {}
    with open(args.results / "cases.csv", newline="") as fh:
        by: dict[tuple[str, str, int, str], list[dict[str, str]]] = defaultdict(list)
        for r in csv.DictReader(fh):
            by[(r["regime"], r["variant"], int(r["seed"]), r["client"])].append(r)
    for key, rows in by.items():
        empty_models[key] = all(
            (r["tumour_slice_dice"] in ("", "0")) and (r["empty_slice_fp_rate"] in ("", "0"))
            for r in rows
        )
    stats: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for cell in sorted((args.results / "cells").iterdir()):
        meta_path, summary_path = cell / "cell.json", cell / "run" / "summary.json"
        if not (meta_path.is_file() and summary_path.is_file()):
            continue
        meta = json.loads(meta_path.read_text())
        if args.regime and meta.get("regime") not in args.regime:
            continue
        summary = json.loads(summary_path.read_text())
        rounds = summary["time"]["rounds"]
        with open(cell / "run" / "metrics.csv", newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r["stage"] in ("federated", "finetune")]
        s = stats[(meta.get("regime", ""), meta["variant"])]
        for name, c in summary["clients"].items():
            curve = {
                int(r["round"]): float(r["val_case_dice"]) for r in rows if r["client"] == name
            }
            key = (meta.get("regime", ""), meta["variant"], meta["seed"], name)
            if key in empty_models:
                s["empty"].append(float(empty_models[key]))
            s["from_ft"].append(float(c["best_round"] > rounds))
            if rounds + 1 in curve:
                ok = curve[rounds] >= args.ok
                s["fed_ok"].append(float(ok))
                if ok:
                    s["ft_collapse"].append(float(curve[rounds + 1] < args.empty))

    def share(v: list[float]) -> str:
        return f"{sum(v):.0f}/{len(v)}" if v else "–"

    print("| regime | variant | fed ok | ft collapse | from ft | empty |")
    print("|---|---|---|---|---|---|")
    for (regime, variant), s in sorted(stats.items()):
        print(
            f"| {regime} | {variant} | {share(s['fed_ok'])} | {share(s['ft_collapse'])} | "
            f"{share(s['from_ft'])} | {share(s['empty'])} |"
        )


if __name__ == "__main__":
    main()
