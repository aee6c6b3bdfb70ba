"""Table for benchmarks/flower/run.sh: time and traffic per round on each runtime."""

import json
import sys
from pathlib import Path

root = Path(sys.argv[1])
print(
    "| runtime | s/round | s in the runner | s whole command | test Dice (mean) "
    "| runner count up/down per client-round (MB) "
    "| Flower ArrayRecord count up/down (MB) | Flower network traffic, whole run (MB) |"
)
print("|---|---|---|---|---|---|---|---|")
for name in ("inprocess", "flower-sim", "flower-deploy"):
    path = root / name / "summary.json"
    if not path.is_file():
        continue
    s = json.loads(path.read_text())
    c = s["comm"]
    flower = "–"
    if "flower_bytes_up_per_round" in c:
        up, down = c["flower_bytes_up_per_round"], c["flower_bytes_down_per_round"]
        flower = f"{up / 1e6:.3f} / {down / 1e6:.3f}"
    run = s.get("flower") or {}
    run_file = root / name / "flower" / "run.json"
    if run_file.is_file():
        run = json.loads(run_file.read_text())
    traffic = run.get("network-traffic", {}).get("total-bytes")
    traffic_s = "–" if traffic is None else f"{traffic / 1e6:.2f}"
    wall_file = root / name / "wall.json"
    wall = json.loads(wall_file.read_text())["wall_s"] if wall_file.is_file() else float("nan")
    print(
        f"| {name} | {s['time']['seconds_per_round']:.1f} | "
        f"{s['time']['seconds_total']:.0f} | {wall:.0f} | "
        f"{s['mean']['test']['dice']:.3f} | {c['bytes_up_per_round'] / 1e6:.3f} / "
        f"{c['bytes_down_per_round'] / 1e6:.3f} | {flower} | {traffic_s} |"
    )
