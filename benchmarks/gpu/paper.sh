#!/usr/bin/env bash
# benchmarks/paper.yaml (w=64, 128^2, every training image, 3 seeds) on one GPU, in parts of about
# ten minutes. Each run
#   1. unpacks the payload once per machine (into $WORK, reused by later runs on it),
#   2. runs the bench stages in priority order until BUDGET seconds are used; the cell running
#      then is stopped and resumes on the next run from its last checkpoint (the bench cache
#      skips finished cells),
#   3. writes REPORT.md with `fedoap report` and packs every cell, without checkpoints, into
#      $OUT/paper-results.tar.gz (unpack it into benchmarks/results/paper/ here).
# Build the payload with `bash benchmarks/gpu/pack.sh` on a machine with ../shared/data; with
# .gpu/payload.tar.xz in the repository on the GPU machine, run `bash benchmarks/gpu/paper.sh`
# there, and again (same command) until every cell is in.
#
# STAGES (default "first core rest ablation"), in this order:
#   first     fedoap seed 0 alone: one cell's time and memory before the rest are planned
#   core      fedoap, local, feddp x seeds 0 1 2
#   rest      ditto, apfl, fedavg x seeds 0 1 2
#   ablation  fedoap no_dca and kv_bank, seed 0
#   long      benchmarks/paper-long.yaml: fedoap and local, seed 0
# BUDGET (default 480) seconds of bench work per run; JOBS (default 1) cells at a time;
# CKPT (default 5) federation.checkpoint_every (an execution setting, not part of a cell's
# identity: 5 writes the 2.8 GB resume checkpoint at the end of each stage only).
# CPU dry run of the whole script, one shrunk cell (numbers meaningless):
#   QUICK=1 PY=python BUDGET=2400 bash benchmarks/gpu/paper.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
OUT=${OUT:-/tmp/fedoap-paper-out}
WORK=${WORK:-/tmp/fedoap-paper}
PY=${PY:-python3}
BUDGET=${BUDGET:-480}
JOBS=${JOBS:-1}
CKPT=${CKPT:-5}
STAGES=${STAGES:-first core rest ablation}
start=$(date +%s)
deadline=$((start + BUDGET))
mkdir -p "$OUT" "$WORK"
RES=$WORK/paper
LONG=$WORK/paper-long
mkdir -p "$RES" "$LONG"

if [ ! -f "$WORK/.unpacked" ]; then
  tar -C "$WORK" -xJf .gpu/payload.tar.xz || exit 1
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$WORK"/whl/*.whl || exit 1
  touch "$WORK/.unpacked"
fi
export PYTHONPATH="$REPO/src:$WORK/site" PYTHONUNBUFFERED=1 FEDOAP_CACHE_DIR="$WORK/cache"
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"
{ date -u; nvidia-smi || true; $PY -c 'import torch; print(torch.__version__, torch.version.cuda)'; } \
  > "$RES/machine.txt" 2>&1

# The specs, pointed at the prepared data: the clients are named as in configs/paper.yaml.
quick=()
if [ "${QUICK:-0}" = 1 ]; then
  STAGES=quick
  # 64 training images per client; one round and one fine-tuning epoch, and
  # small val/test caps, so that it ends in ~15 min on 2 cores (w=64 at 128^2 trains at ~1.3 s
  # per image there); fp32 and no compile, since this CPU emulates bf16.
  quick=(data.max_train_images=64 data.max_val_images=16 data.max_test_images=16
         federation.rounds=1 finetune.epochs=1 train.compile=false train.precision=fp32)
fi
source benchmarks/gpu/lib.sh
write_spec paper "federation.checkpoint_every=$CKPT" "${quick[@]}" || exit 1
write_spec paper-long "federation.checkpoint_every=$CKPT" "${quick[@]}" || exit 1

fb=($PY -m fedoap.cli.main bench --jobs "$JOBS")
for stage in $STAGES; do
  case $stage in
    quick) run_until_deadline quick "$RES/bench.log" "${fb[@]}" -c "$WORK/paper.yaml" -o "$RES" --only main \
             --methods fedoap --seeds 0 ;;
    first) run_until_deadline first "$RES/bench.log" "${fb[@]}" -c "$WORK/paper.yaml" -o "$RES" --only main \
             --methods fedoap --seeds 0 ;;
    core) run_until_deadline core "$RES/bench.log" "${fb[@]}" -c "$WORK/paper.yaml" -o "$RES" --only main \
            --methods fedoap local feddp --seeds 0 1 2 ;;
    rest) run_until_deadline rest "$RES/bench.log" "${fb[@]}" -c "$WORK/paper.yaml" -o "$RES" --only main \
            --methods ditto apfl fedavg --seeds 0 1 2 ;;
    ablation) run_until_deadline ablation "$RES/bench.log" "${fb[@]}" -c "$WORK/paper.yaml" -o "$RES" \
                --only ablation --seeds 0 ;;
    long) run_until_deadline long "$RES/bench.log" "${fb[@]}" -c "$WORK/paper-long.yaml" -o "$LONG" --only main \
            --seeds 0 ;;
    *) echo "unknown stage $stage" | tee -a "$RES/steps.txt" ;;
  esac
done

# Report what is finished, then pack it (no checkpoints: 2.8 GB each).
[ -f "$RES/results.csv" ] && $PY -m fedoap.cli.main report "$RES" --analysis benchmarks/analysis/goals.py >> "$RES/bench.log" 2>&1
[ -f "$LONG/results.csv" ] && $PY -m fedoap.cli.main report "$LONG" --analysis benchmarks/analysis/goals.py >> "$RES/bench.log" 2>&1
tar -C "$WORK" --exclude=checkpoints --exclude='*.tmp' -czf "$OUT/paper-results.tar.gz" \
  paper paper-long
echo "total $(($(date +%s) - start)) s; $(ls "$RES/cells" 2>/dev/null | wc -l) cell folders" \
  | tee -a "$RES/steps.txt"
