"""Table of bf16 vs fp32 runs written by benchmarks/precision/run.sh (reads summary.json)."""

import json
import sys
from pathlib import Path

import numpy as np

root = Path(sys.argv[1])
rows = {}
machines = set()
for s in sorted(root.glob("*/summary.json")):
    d = json.loads(s.read_text())
    execution = d.get("execution") or {}
    machines.add(f"{execution.get('name', 'unrecorded')} ({execution.get('device', '?')})")
    prec = "bf16" if "-bf16-" in s.parent.name else "fp32"
    c = next(iter(d["clients"].values()))
    rows.setdefault(prec, []).append(
        (
            d["seed"],
            c["val"]["dice"],
            c["test"]["dice"],
            c["test"]["hd95_px"],
            d["time"]["seconds_total"],
        )
    )
print(f"Machine: {', '.join(sorted(machines))}; one run at a time.")
print()
print("| precision | seeds | val Dice | test Dice | test HD95 px | seconds per run |")
print("|---|---|---|---|---|---|")
for prec, r in sorted(rows.items()):
    a = np.array([x[1:] for x in r], dtype=float)
    m, sd = a.mean(0), a.std(0, ddof=1) if len(a) > 1 else np.zeros(4)
    print(
        f"| {prec} | {len(r)} | {m[0]:.3f} ± {sd[0]:.3f} | {m[1]:.3f} ± {sd[1]:.3f} | "
        f"{m[2]:.1f} ± {sd[2]:.1f} | {m[3]:.0f} |"
    )
print()
print("Per seed (val Dice / test Dice):")
for prec, r in sorted(rows.items()):
    print(f"- {prec}: " + ", ".join(f"seed {x[0]}: {x[1]:.3f} / {x[2]:.3f}" for x in sorted(r)))
