"""Which site-models of a benchmark are the empty predictor (a model that segments nothing).

A site whose training never gets past "predict background everywhere" still scores: by image
Dice, the share of its test images with an empty mask (an empty prediction on an empty mask
scores 1); by case Dice, the share of its tumour-free cases. Validation can select such a model,
and a table of means then hides it. This computes, for each cell of a results folder, what the
empty predictor scores on each site's test split (from the cell's own config, through the same
data pipeline and metrics as the run) and flags every site-model whose reported test Dice is
within ``--tol-image`` of it by image and ``--tol-case`` by case. It prints one line per regime
and method, and the totals with and without DP.

    python benchmarks/analysis/empty_models.py benchmarks/results/privacy
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from fedoap.config import DataConfig, load_config
from fedoap.data import prepare_clients
from fedoap.metrics.segmentation import case_dice, image_metrics, summarize


def empty_scores(data: DataConfig) -> dict[str, tuple[float, float]]:
    """Each site's (image Dice, case Dice) of the all-background prediction on its test split,
    averaged as a run's test metrics are (:func:`fedoap.metrics.segmentation.summarize`)."""
    out = {}
    for c in prepare_clients(data):
        y = c.test.y
        none = torch.zeros_like(y)
        m = summarize(image_metrics(none, y, hd95=False), case_dice(none, y, c.test.case_ids))
        out[c.name] = (float(m["dice"] or 0.0), float(m["case_dice"] or 0.0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="a bench results folder (with cells/)")
    ap.add_argument("--tol-image", type=float, default=0.01, help="image Dice tolerance")
    ap.add_argument("--tol-case", type=float, default=0.005, help="case Dice tolerance")
    args = ap.parse_args()
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    models: dict[tuple[str, str], int] = defaultdict(int)
    dp: dict[tuple[str, str], bool] = {}
    reference: dict[str, dict[str, tuple[float, float]]] = {}  # data spec -> site -> scores
    for cell in sorted((args.results / "cells").iterdir()):
        summary_path = cell / "run" / "summary.json"
        if not summary_path.is_file():
            continue  # unfinished
        meta = json.loads((cell / "cell.json").read_text())
        summary = json.loads(summary_path.read_text())
        data = load_config(cell / "run" / "config.yaml").data
        key = repr(data)  # the data spec: splits and caps
        if key not in reference:
            reference[key] = empty_scores(data)
        group = (meta.get("regime") or "", meta["method"])
        dp[group] = "privacy" in summary
        for site, res in summary["clients"].items():
            test = res.get("test")
            if not test:
                continue  # excluded (diverged)
            models[group] += 1
            image, case = reference[key][site]
            if (
                abs(test["dice"] - image) <= args.tol_image
                and abs(test["case_dice"] - case) <= args.tol_case
            ):
                found[group].append(f"{site}@{meta['seed']}")
    print("Empty predictor's test scores (image Dice, case Dice):")
    for scores in reference.values():
        print("  " + ", ".join(f"{s} {i:.3f}, {c:.3f}" for s, (i, c) in scores.items()))
    print("| regime | method | site-models | empty | which (site@seed) |")
    print("|---|---|---|---|---|")
    for group in sorted(models):
        hits = found[group]
        print(f"| {group[0]} | {group[1]} | {models[group]} | {len(hits)} | {' '.join(hits)} |")
    for label, want in (("with DP", True), ("without DP", False)):
        n = sum(v for g, v in models.items() if dp[g] is want)
        k = sum(len(found[g]) for g in models if dp[g] is want)
        print(f"{label}: {k} of {n} site-models are the empty predictor")


if __name__ == "__main__":
    main()
