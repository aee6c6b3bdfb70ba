#!/usr/bin/env bash
# On one GPU: benchmarks/privacy.yaml and benchmarks/robustness.yaml (FedOAP and
# FedAvg), every seed, on one GPU. Each run
#   1. unpacks the payload once per machine (into $WORK, reused by later runs on it),
#   2. runs a one-round smoke run (DP-SGD FedOAP, and FedAvg with an attack and the median), and
#      stops there if it fails, before any device time goes into the benchmarks,
#   3. runs the three benches at the same time until BUDGET seconds are used; the cells running
#      then are stopped (the bench cache skips finished cells on the next run),
#   4. packs every finished cell, without checkpoints, into $OUT/trust-results.tar.gz. Unpack it
#      here and report each folder with `fedoap report` (the CPU is enough for that).
# Build the payload with `bash benchmarks/gpu/pack.sh configs/federation4.yaml` on a machine with
# ../shared/data; with .gpu/payload.tar.xz in the repository on the GPU machine, run
# `bash benchmarks/gpu/trust.sh` there (about 10 minutes a run), and again until every cell is in.
# BUDGET (default 470) seconds of bench work per run; JOBS_PRIVACY, JOBS_FEDOAP, JOBS_FEDAVG
# (default 6, 6, 4) cells at a time in each bench; SEEDS (default "0 1 2"); DETERMINISTIC
# (default 1) adds train.deterministic=true to every cell. Without it, two runs of one config on
# an H200 differed by up to 6 points of the honest sites' mean Dice (docs/results/robustness.md),
# more than the 2-point goal that the robustness bench checks, so an attack's effect in one seed
# could not be told from the run's own noise. On the CPU the runs repeat bit for bit anyway.
# CPU dry run of the whole script (numbers meaningless):
#   PY=python BUDGET=120 JOBS_PRIVACY=1 JOBS_FEDOAP=1 JOBS_FEDAVG=1 bash benchmarks/gpu/trust.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
OUT=${OUT:-/tmp/fedoap-trust-out}
WORK=${WORK:-/tmp/fedoap-trust}
PY=${PY:-python3}
BUDGET=${BUDGET:-470}
SEEDS=${SEEDS:-0 1 2}
start=$(date +%s)
mkdir -p "$OUT" "$WORK"
RES=$WORK/results
mkdir -p "$RES"

if [ ! -f "$WORK/.unpacked" ]; then
  tar -C "$WORK" -xJf .gpu/payload.tar.xz || exit 1
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$WORK"/whl/*.whl || exit 1
  touch "$WORK/.unpacked"
fi
export PYTHONPATH="$REPO/src:$WORK/site" PYTHONUNBUFFERED=1 FEDOAP_CACHE_DIR="$WORK/cache"
{ date -u; nvidia-smi || true; $PY -c 'import torch; print(torch.__version__, torch.version.cuda)'; } \
  > "$RES/machine.txt" 2>&1

EXEC=()
[ "${DETERMINISTIC:-1}" = 1 ] && EXEC=(train.deterministic=true)
# The specs, pointed at the prepared data (the clients keep federation4's names).
source benchmarks/gpu/lib.sh
write_spec privacy "${EXEC[@]}" || exit 1
write_spec robustness "${EXEC[@]}" || exit 1
DATA_OVERRIDES=("data.root=$WORK/data"
  "data.clients=$($PY -c "import yaml,sys; print(yaml.safe_dump(yaml.safe_load(open(sys.argv[1]))['data']['clients'], default_flow_style=True, width=10**6).strip())" "$WORK/data/clients.yaml")")

# Smoke: one round on 16 images per client, the two code paths the benches lean on.
smoke=(-c "$REPO/configs/federation4.yaml" "${DATA_OVERRIDES[@]}" federation.rounds=1
       finetune.epochs=1 data.max_train_images=16 data.max_val_images=8 data.max_test_images=8
       train.precision=fp32 "${EXEC[@]}" --quiet --force)
t0=$(date +%s)
$PY -m fedoap.cli.main run "${smoke[@]}" method=fedoap privacy.dp.enabled=true \
  privacy.dp.epsilon=8 -o "$WORK/smoke-dp" > "$RES/smoke-dp.log" 2>&1 &
p1=$!
$PY -m fedoap.cli.main run "${smoke[@]}" method=fedavg federation.aggregator=median \
  'federation.attack.clients=[breast_us]' federation.attack.kind=noise -o "$WORK/smoke-attack" \
  > "$RES/smoke-attack.log" 2>&1 &
p2=$!
wait $p1; r1=$?
wait $p2; r2=$?
echo "smoke: dp rc=$r1 attack rc=$r2 $(($(date +%s) - t0)) s" | tee -a "$RES/steps.txt"
if [ $r1 -ne 0 ] || [ $r2 -ne 0 ]; then
  tail -n 30 "$RES/smoke-dp.log" "$RES/smoke-attack.log"
  tar -C "$WORK" -czf "$OUT/trust-results.tar.gz" results
  exit 3
fi

deadline=$(($(date +%s) + BUDGET))
MIN_LEFT=0  # the benches start together, right after the deadline is set

# shellcheck disable=SC2086  # SEEDS is a list
{
  run_until_deadline privacy "$RES/privacy.log" $PY -m fedoap.cli.main bench -c "$WORK/privacy.yaml" \
    -o "$RES/privacy" --jobs "${JOBS_PRIVACY:-6}" --seeds $SEEDS &
  run_until_deadline robustness-fedoap "$RES/robustness-fedoap.log" $PY -m fedoap.cli.main bench -c "$WORK/robustness.yaml" \
    -o "$RES/robustness" --only main --only attack --methods fedoap --jobs "${JOBS_FEDOAP:-6}" \
    --seeds $SEEDS &
  # A second bench process on the same folder: its cells (fedavg) are disjoint from fedoap's,
  # but both rewrite results.csv, so it writes to its own folder and the two are merged here.
  run_until_deadline robustness-fedavg "$RES/robustness-fedavg.log" $PY -m fedoap.cli.main bench -c "$WORK/robustness.yaml" \
    -o "$RES/robustness-fedavg" --only main --only attack --methods fedavg \
    --jobs "${JOBS_FEDAVG:-4}" --seeds $SEEDS &
  wait
}

# Unfinished cells (stopped at the deadline) are left out; their logs stay for a look.
$PY - "$RES" <<'PY'
import shutil
import sys
from pathlib import Path

res = Path(sys.argv[1])
for bench in ("privacy", "robustness", "robustness-fedavg"):
    cells = res / bench / "cells"
    for cell in sorted(cells.iterdir()) if cells.is_dir() else []:
        done = (cell / "run" / "summary.json").is_file() or (cell / "diverged.txt").is_file()
        if not done:
            (res / "unfinished").mkdir(exist_ok=True)
            log = cell / "log.txt"
            if log.is_file():
                shutil.copy(log, res / "unfinished" / f"{bench}.{cell.name}.log")
            shutil.rmtree(cell)
PY
tar -C "$WORK" --exclude=checkpoints --exclude='*.tmp' --exclude=splits.json \
  -czf "$OUT/trust-results.tar.gz" results
for b in privacy robustness robustness-fedavg; do
  echo "$b: $(ls "$RES/$b/cells" 2>/dev/null | wc -l) finished cells"
done | tee -a "$RES/steps.txt"
echo "total $(($(date +%s) - start)) s" | tee -a "$RES/steps.txt"
