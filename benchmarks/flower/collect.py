"""Tables for benchmarks/flower/run.sh: time and traffic per round on each runtime, and where a
federated round's seconds go.

In-process, the sites run one after another in one process; the split is the run's phases
(``summary.json`` ``time.phases``) per step. On Flower, each reply carries the seconds its site
spent per phase (``transport.steps[*].sites``); a round lasts as long as its slowest site plus
what Flower adds (polling, message transport, process management), given as the rest of the
round's wall time.
"""

import json
import sys
from pathlib import Path

root = Path(sys.argv[1])
RUNTIMES = ("inprocess", "flower-sim", "flower-deploy")
PHASES = ("startup", "data", "state", "train", "validate")


def load(name):
    path = root / name / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


print(
    "| runtime | s/round | s in the server | s whole command | test Dice (mean) "
    "| raw tensor MB up/down per site-round | Flower message MB per round (all sites) "
    "| Flower network traffic, whole run (MB) |"
)
print("|---|---|---|---|---|---|---|---|")
for name in RUNTIMES:
    s = load(name)
    if s is None:
        continue
    c = s["comm"]
    t = s.get("transport") or {}
    per_round = t.get("bytes_per_round")
    flower = "–" if not per_round else f"{(per_round['up'] + per_round['down']) / 1e6:.2f}"
    run = s.get("flower") or {}
    run_file = root / name / "flower" / "run.json"  # scripts/flower_loopback.sh
    if run_file.is_file():
        run = json.loads(run_file.read_text())
    traffic = run.get("network-traffic", {}).get("total-bytes")
    traffic_s = "–" if not traffic else f"{traffic / 1e6:.2f}"
    wall_file = root / name / "wall.json"
    wall = json.loads(wall_file.read_text())["wall_s"] if wall_file.is_file() else float("nan")
    print(
        f"| {name} | {s['time']['seconds_per_round']:.1f} | "
        f"{s['time']['seconds_total']:.0f} | {wall:.0f} | "
        f"{s['mean']['test']['dice']:.3f} | {c['bytes_up_per_round'] / 1e6:.3f} / "
        f"{c['bytes_down_per_round'] / 1e6:.3f} | {flower} | {traffic_s} |"
    )

print()
print("Seconds per federated round, split (mean over rounds):")
print()
print(
    "| runtime | round | process start + import | data | site state I/O | training "
    "| validation | aggregate + checkpoint | Flower transport and waiting |"
)
print("|---|---|---|---|---|---|---|---|---|")
for name in RUNTIMES:
    s = load(name)
    if s is None:
        continue
    steps = [x for x in (s.get("transport") or {}).get("steps", []) if x["stage"] == "federated"]
    if not steps:  # in-process: sites one after another; the run's phases per step
        ph = s["time"].get("phases", {})
        n = s["time"]["rounds"] + s["time"]["finetune_epochs"]
        rnd = s["time"]["seconds_per_round"]
        print(
            f"| {name} | {rnd:.1f} | – | {ph.get('data', 0) / n:.2f} | – | "
            f"{ph.get('train', 0) / n:.2f} | {ph.get('validate', 0) / n:.2f} | "
            f"{(ph.get('aggregate', 0) + ph.get('checkpoint', 0)) / n:.2f} | – |"
        )
        continue
    walls, slowest, rest = [], {p: 0.0 for p in PHASES}, []
    for x in steps:
        # The slowest site decides when the round can end.
        site = max(x["sites"].values(), key=lambda v: sum(v.values()))
        for p in PHASES:
            slowest[p] += site.get(p, 0.0) / len(steps)
        walls.append(x["wall_s"])
        rest.append(x["wall_s"] - sum(site.values()))
    mean_wall = sum(walls) / len(walls)
    print(
        f"| {name} | {mean_wall:.1f} | {slowest['startup']:.2f} | {slowest['data']:.2f} | "
        f"{slowest['state']:.2f} | {slowest['train']:.2f} | {slowest['validate']:.2f} | – | "
        f"{sum(rest) / len(rest):.2f} |"
    )
