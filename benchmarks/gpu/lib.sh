# Shared by the GPU scripts (paper.sh, trust.sh); sourced, not run. Each caller sets
# PY, REPO, WORK, RES and, before run_until_deadline, deadline (epoch seconds).

# write_spec NAME [OVERRIDE ...]: $WORK/NAME.yaml from benchmarks/NAME.yaml, pointed at the
# prepared data in $WORK/data (its clients.yaml), with every base path made absolute (the spec's
# and each regime's) and OVERRIDEs after the data ones, before the spec's own.
write_spec() {
  local name=$1
  shift
  $PY - "$REPO/benchmarks/$name.yaml" "$WORK/$name.yaml" "$WORK/data" "$@" <<'PY'
import sys
from pathlib import Path

import yaml

src, dst, data, *extra = sys.argv[1:]
spec = yaml.safe_load(Path(src).read_text())
clients = yaml.safe_load((Path(data) / "clients.yaml").read_text())["data"]["clients"]
for part in [spec, *spec.get("regimes", [])]:
    if "base" in part:
        part["base"] = str((Path(src).parent / part["base"]).resolve())
flow = yaml.safe_dump(clients, default_flow_style=True, width=10**6).strip()
spec["overrides"] = [
    f"data.root={data}", f"data.clients={flow}", *extra, *spec.get("overrides", [])
]
Path(dst).write_text(yaml.safe_dump(spec, sort_keys=False))
PY
}

# run_until_deadline LABEL LOG CMD...: run CMD in its own process group, appending to LOG, and
# stop the whole group at $deadline. Not started when MIN_LEFT (default 30) seconds or fewer
# remain. Each outcome is appended to $RES/steps.txt.
run_until_deadline() {
  local label=$1 log=$2 left rc t0
  shift 2
  left=$((deadline - $(date +%s)))
  if [ "$left" -le "${MIN_LEFT:-30}" ]; then
    echo "$label: not started (budget used)" | tee -a "$RES/steps.txt"
    return 0
  fi
  t0=$(date +%s)
  setsid "$@" >> "$log" 2>&1 &
  local pid=$!
  ( sleep "$left"; kill -TERM -- "-$pid" 2>/dev/null; sleep 10; kill -KILL -- "-$pid" 2>/dev/null ) &
  local watcher=$!
  wait "$pid"
  rc=$?
  kill "$watcher" 2>/dev/null
  wait "$watcher" 2>/dev/null
  echo "$label: rc=$rc $(($(date +%s) - t0)) s" | tee -a "$RES/steps.txt"
}
