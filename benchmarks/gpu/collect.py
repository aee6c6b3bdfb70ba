"""``results.md`` from one ``benchmarks/gpu/run.sh`` run's unpacked results, with the GPU goals.

python benchmarks/gpu/collect.py benchmarks/results/gpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _table(rows: list[list[Any]], head: list[str]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return out


def collect(res: Path) -> str:
    lines = ["# GPU measurements", ""]
    steps = (res / "steps.txt").read_text() if (res / "steps.txt").is_file() else ""
    tp_path = res / "throughput.json"
    tp = json.loads(tp_path.read_text()) if tp_path.is_file() else {"settings": []}
    machine = tp.get("machine", {})
    lines += [
        f"Machine: {machine.get('name', machine.get('device', '?'))}, torch {machine.get('torch')}"
        f" (CUDA {machine.get('cuda')}), {tp.get('date', '?')}. Command: "
        "`bash benchmarks/gpu/run.sh` (see its header).",
        "",
        "## Training throughput (images/s)",
        "",
    ]
    rows = []
    for s in tp["settings"]:
        if "error" in s:
            rows.append([s["name"], s["mode"], "failed", "", "", "", "", s["error"][:80]])
            continue
        rows.append(
            [
                s["name"],
                s["mode"],
                s["real_images_per_s"],
                s["bare_images_per_s"],
                f"{100 * s['real_over_bare']:.0f}%",
                s["real_tflop_per_s"],
                s["warm_up_s"],
                s["peak_memory_gib"],
            ]
        )
    lines += _table(
        rows,
        ["setting", "mode", "real loop", "bare", "real/bare", "TFLOP/s", "warm-up s", "GiB"],
    )
    summary_path = res / "paper-fedoap" / "summary.json"
    lines += ["", "## One FedOAP configs/paper.yaml run", ""]
    goals = []
    if summary_path.is_file():
        s = json.loads(summary_path.read_text())
        t = s["time"]
        phases = t.get("phases", {})
        lines += [
            f"Mean test Dice {s['mean']['test']['dice']:.3f}; wall time {t['seconds_total']:.1f} s"
            " from the first round to the summary, plus data loading "
            f"{phases.get('data', 0):.1f} s; on "
            f"{s.get('execution', {}).get('name', s.get('execution', {}).get('device', '?'))}.",
            "",
        ]
        lines += _table([[k, f"{v:.1f}"] for k, v in phases.items()], ["phase", "seconds"])
        total = t["seconds_total"] + phases.get("data", 0)
        goals.append(f"- paper-scale FedOAP run <= 120 s: {total:.0f} s -> {total <= 120}")
    else:
        lines.append("No summary: the run did not finish (see paper-fedoap.log).")
    by_name = {s["name"]: s for s in tp["settings"] if "error" not in s}
    for name in ("w64-128-b64-eager", "w64-128-b64-compiled"):
        if name in by_name:
            r = by_name[name]["real_over_bare"]
            goals.append(f"- {name}: real loop >= 85% of bare: {100 * r:.0f}% -> {r >= 0.85}")
    small = [s for n, s in by_name.items() if n.startswith("w8-96-b8")]
    if small:
        best = max(small, key=lambda s: s["real_images_per_s"])
        ok = best["real_images_per_s"] >= 1400
        goals.append(
            f"- w=8, 96^2, batch 8 >= 1,400 images/s per client: {best['real_images_per_s']:.0f}"
            f" ({best['mode']}) -> {ok}"
        )
    if not str(machine.get("device", "")).startswith("cuda"):
        goals = [f"Not evaluated: this was a dry run on {machine.get('device')}, not a GPU."]
    lines += ["", "## Goals", "", *goals, "", "## Steps (exit code, seconds)", "", "```", steps]
    lines += ["```", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path)
    args = ap.parse_args()
    text = collect(args.results)
    (args.results / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
