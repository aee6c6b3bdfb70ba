#!/usr/bin/env bash
# The loopback deployment of an older release (commit f96a2a6, whose sites kept their state apart
# from the runner's) and of this code, on this machine:
# the quickstart in fp32, 3 rounds, no fine-tuning, four SuperNodes with one thread each; and the
# same config in-process with one thread, which the deployment should equal.
#   bash benchmarks/flower/before_after.sh    # writes benchmarks/results/flower/before-after/
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$PWD/benchmarks/results/flower/before-after
work=$(mktemp -d)
old=$work/old
git worktree add -f "$old" f96a2a6 > /dev/null
trap 'git worktree remove --force "$old"; rm -rf "$work"' EXIT
over=(train.precision=fp32 train.select_metric=dice federation.rounds=3 finetune.epochs=0)
fedoap config -c configs/quickstart.yaml "${over[@]}" > "$work/q3.yaml"
(cd "$old" && PYTHONPATH="$old/src" fedoap config -c configs/quickstart.yaml "${over[@]}" > "$work/q3-old.yaml")
(cd "$old" && OMP_NUM_THREADS=1 PYTHONPATH="$old/src" FEDOAP_SUPERLINK_PORT=9492 \
  bash scripts/flower_loopback.sh "$work/q3-old.yaml" "$work/before")
OMP_NUM_THREADS=1 FEDOAP_SUPERLINK_PORT=9592 bash scripts/flower_loopback.sh "$work/q3.yaml" "$work/after"
fedoap run -c "$work/q3.yaml" -o "$work/inprocess-1thread" --quiet train.num_threads=1 > /dev/null
for run in before after inprocess-1thread; do
  mkdir -p "$out/$run"
  cp "$work/$run/summary.json" "$work/$run/metrics.csv" "$work/$run/config.yaml" "$out/$run/"
  [ -f "$work/$run/flower/run.json" ] && cp "$work/$run/flower/run.json" "$out/$run/"
done
python - "$out" > "$out/results.md" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| run | s/round | mean test Dice | per client | Flower traffic in / out (MB) |")
print("|---|---|---|---|---|")
for run in ("before", "after", "inprocess-1thread"):
    s = json.loads((out / run / "summary.json").read_text())
    f = out / run / "run.json"
    t = json.loads(f.read_text())["network-traffic"] if f.is_file() else None
    traffic = f"{t['inbound-bytes'] / 1e6:.1f} / {t['outbound-bytes'] / 1e6:.1f}" if t else "–"
    per = ", ".join(f"{k} {c['test']['dice']:.4f}" for k, c in sorted(s["clients"].items()))
    print(f"| {run} | {s['time']['seconds_per_round']:.1f} | {s['mean']['test']['dice']:.4f} | {per} | {traffic} |")
PY
cat "$out/results.md"
