"""LGG as four hospitals' nnU-Net datasets: what reading volumes costs, and whether a NIfTI
prediction equals the run's own figure.

    python benchmarks/volumes/lgg_nnunet.py [--out benchmarks/results/volumes]

Builds, in a temporary folder that is deleted afterwards (the LGG licence forbids
redistribution), one nnU-Net v2 raw dataset per TCGA institution with at least 10 patients (DU,
HT, CS, FG) from ``../shared/data/lgg_brain_mri.npz``: one FLAIR volume per patient, slices in
order, 1.875 x 1.875 x 3 mm (``tests/volumes_lgg.py``). Then, on this machine:

1. reads each site through ``source: nnunet`` with an empty cache, then again from the cache;
2. runs a short FedOAP federation on the four sites (fp32, 128 x 128: the slices' own size, so
   letterboxing is the identity; otherwise the quickstart's settings, width 8);
3. predicts every test-split patient of every site from its NIfTI volume with ``predict_images``
   (a folder in, a folder of masks out), and compares the Dice of each written mask against the
   label volume with the Dice the run's model gives the same patient's slices in memory.

Writes ``lgg_nnunet.json`` and ``lgg_nnunet.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

SITES = ("DU", "HT", "CS", "FG")


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def finite_or_none(x: float) -> float | None:
    return x if np.isfinite(x) else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "volumes")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import nibabel as nib
    import torch

    from fedoap.api import load_client_model, predict_images, run_experiment
    from fedoap.config import load_config
    from fedoap.data.dataset import load_raw, make_client
    from fedoap.metrics.segmentation import case_dice
    from fedoap.training import predict_logits
    from tests.volumes_lgg import lgg_volumes, write_nnunet

    work = Path(tempfile.mkdtemp(prefix="fedoap-lgg-nnunet-"))
    try:
        t0 = time.perf_counter()
        patients = {}
        for k, site in enumerate(SITES, 1):
            vols = lgg_volumes(args.data / "lgg_brain_mri.npz", sites=[site])
            write_nnunet(work / "raw" / f"Dataset00{k}_LGG{site}", vols)
            patients[site] = len(vols)
        build_s = time.perf_counter() - t0

        clients = [
            {"name": site.lower(), "source": "nnunet", "path": f"Dataset00{k}_LGG{site}"}
            for k, site in enumerate(SITES, 1)
        ]
        overrides = [
            f"data.root={work / 'raw'}",
            f"data.cache_dir={work / 'cache'}",
            "data.image_size=128",
            "data.max_train_images=128",
            "model.width=8",
            "train.precision=fp32",
            f"federation.rounds={args.rounds}",
            "finetune.epochs=1",
            "data.clients=" + json.dumps(clients),
        ]
        cfg = load_config(REPO / "configs" / "quickstart.yaml", overrides)

        reads = {}
        for spec in cfg.data.clients:
            t = time.perf_counter()
            raw = load_raw(spec, cfg.data)
            first = time.perf_counter() - t
            t = time.perf_counter()
            load_raw(spec, cfg.data)
            reads[spec.name] = {
                "volumes": int(len(set(raw.case_ids.tolist()))),
                "slices": int(len(raw.names)),
                "first_read_s": round(first, 3),
                "cached_read_s": round(time.perf_counter() - t, 3),
            }

        t = time.perf_counter()
        summary = run_experiment(cfg, work / "run", progress=False)
        run_s = time.perf_counter() - t

        per_case = []
        predict_s, predicted = 0.0, 0
        for k, (site, spec) in enumerate(zip(SITES, cfg.data.clients, strict=True), 1):
            data = make_client(spec, cfg.data)
            _, model = load_client_model(work / "run", spec.name, torch.device("cpu"))
            drawn = (predict_logits(model, data.test.x, "fp32")[:, 0] > 0).numpy()
            memory = case_dice(
                torch.from_numpy(drawn[:, None]), data.test.y > 0.5, list(data.test.case_ids)
            )
            root = work / "raw" / f"Dataset00{k}_LGG{site}"
            folder = work / "in" / spec.name
            folder.mkdir(parents=True)
            for case in sorted(memory):
                (folder / f"{case}_0000.nii.gz").symlink_to(
                    root / "imagesTr" / f"{case}_0000.nii.gz"
                )
            t = time.perf_counter()
            written = predict_images(work / "run", spec.name, [folder], work / "out" / spec.name)
            predict_s += time.perf_counter() - t
            predicted += len(written)
            for (path,) in written:
                case = path.name.removesuffix("_0000_mask.nii.gz")
                pred = np.asarray(nib.load(path).dataobj)  # type: ignore[attr-defined]
                label = np.asarray(nib.load(root / "labelsTr" / f"{case}.nii.gz").dataobj)  # type: ignore[attr-defined]
                inter, total = float((pred * label).sum()), float(pred.sum() + label.sum())
                per_case.append(
                    {
                        "site": spec.name,
                        "case": case,
                        "slices": int(label.shape[2]),
                        # Both empty: no Dice (NaN in memory), None here and in the JSON.
                        "dice_file": 2 * inter / total if total else None,
                        "dice_memory": finite_or_none(memory[case]),
                    }
                )
        both = [c for c in per_case if c["dice_file"] is not None]
        if any((c["dice_memory"] is None) != (c["dice_file"] is None) for c in per_case):
            raise SystemExit("a patient has a Dice in one place and none in the other")
        diffs = [abs(c["dice_file"] - c["dice_memory"]) for c in both]
        result = {
            "machine": f"{cpu_name()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, no GPU",
            "torch": torch.__version__,
            "patients": patients,
            "build_datasets_s": round(build_s, 2),
            "reads": reads,
            "run": {
                "s": round(run_s, 1),
                "rounds": args.rounds,
                "config": overrides[2:-1],
                "test_dice": {n: c["test"]["dice"] for n, c in summary["clients"].items()},
                "test_case_dice": {
                    n: c["test"]["case_dice"] for n, c in summary["clients"].items()
                },
            },
            "predict": {
                "volumes": predicted,
                "s_per_volume": round(predict_s / max(predicted, 1), 3),
                "max_abs_dice_difference_file_vs_memory": max(diffs) if diffs else None,
                "cases": per_case,
            },
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lgg_nnunet.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    lines = [
        "# LGG as four nnU-Net datasets (`python benchmarks/volumes/lgg_nnunet.py`)",
        "",
        f"Machine: {result['machine']}; torch {result['torch']}.",
        "",
        "| site | patients | slices | first read (s) | cached read (s) | test Dice | "
        "test case Dice |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in cfg.data.clients:
        r = reads[spec.name]
        lines.append(
            f"| {spec.name} | {r['volumes']} | {r['slices']} | {r['first_read_s']} | "
            f"{r['cached_read_s']} | {result['run']['test_dice'][spec.name]:.3f} | "
            f"{result['run']['test_case_dice'][spec.name]:.3f} |"
        )
    p = result["predict"]
    lines += [
        "",
        f"Building the four datasets from the npz: {result['build_datasets_s']} s. "
        f"FedOAP, {args.rounds} rounds + 1 fine-tuning epoch at 128 x 128, width 8, fp32, "
        f"<= 128 training slices per site: {result['run']['s']} s.",
        "",
        f"`predict` on every test patient's NIfTI volume ({p['volumes']} volumes): "
        f"{p['s_per_volume']} s per volume. Largest |Dice of the written mask - Dice in memory| "
        f"over those patients: {p['max_abs_dice_difference_file_vs_memory']}.",
    ]
    (args.out / "lgg_nnunet.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
