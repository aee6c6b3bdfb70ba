#!/usr/bin/env bash
# Seconds per round and bytes per round of the quickstart config on three runtimes, on this
# machine: the in-process runner, Flower's simulation engine, and a Flower deployment on
# loopback (SuperLink + one SuperNode per client). Writes benchmarks/results/flower/results.md.
#   bash benchmarks/flower/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
out=benchmarks/results/flower
mkdir -p "$out"
# fp32: this machine's CPU has no native bf16 (fedoap says so at start), and emulated bf16
# convolutions are ~20x slower than fp32 here; the runtimes are compared on the same precision.
# Selection on per-image Dice (the default is case Dice), the setting of the committed cells, so
# that they stay what this script produces.
cfg=$out/quickstart-fp32.yaml
fedoap config -c configs/quickstart.yaml train.precision=fp32 train.select_metric=dice > "$cfg"
timed() {  # timed NAME COMMAND...: run once, record the whole command's wall-clock seconds
  local name=$1; shift
  [ -f "$out/$name/summary.json" ] && return
  local t0; t0=$(date +%s.%N)
  "$@" > /dev/null
  python -c "import json; json.dump({'wall_s': $(date +%s.%N) - $t0}, open('$out/$name/wall.json', 'w'))"
}
timed inprocess fedoap run -c "$cfg" -o "$out/inprocess" --quiet --force
timed flower-sim fedoap run -c "$cfg" -o "$out/flower-sim" --quiet --force federation.runtime=flower-sim
[ -f "$out/flower-deploy/summary.json" ] || rm -rf "$out/flower-deploy"
FEDOAP_SUPERLINK_PORT=9392 timed flower-deploy scripts/flower_loopback.sh "$cfg" "$out/flower-deploy"
python benchmarks/flower/collect.py "$out" > "$out/results.md"
cat "$out/results.md"
