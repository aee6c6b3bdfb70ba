#!/usr/bin/env bash
# The GPU measurements as one command, sized for <= 8 min on one H100:
#   1. training images/s through fedoap's real loop beside the bare model + optimiser
#      (w=64, 128^2, batch 64, bf16; eager and compiled) and the small CPU profile
#      (w=8, 96^2, batch 8 and 64; eager and CUDA graphs);           benchmarks/gpu/throughput.py
#   2. one whole FedOAP configs/paper.yaml run: wall time and summary.json's time.phases;
#   3. the CUDA tests (determinism, a CUDA and a CPU site in one federation, kill and resume);
#   4. with LONG=1 (another call): `local` on configs/paper-long.yaml, for its validation curve.
# On a machine with ../shared/data, `bash benchmarks/gpu/pack.sh` builds .gpu/payload.tar.xz (the
# data and the wheels the GPU machine lacks); with it in the repository on the GPU machine, run
# `bash benchmarks/gpu/run.sh` there. Everything lands in $OUT/gpu-results.tar.gz (no
# checkpoints); unpack it into
# benchmarks/results/gpu/ and run `python benchmarks/gpu/collect.py benchmarks/results/gpu`.
# A CPU dry run of the whole script (tiny sizes, numbers meaningless): QUICK=1 bash ...
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/fedoap-gpu-out}
WORK=${WORK:-/tmp/fedoap-gpu}
PY=${PY:-python3}
mkdir -p "$OUT" "$WORK"
RES=$WORK/results
rm -rf "$RES" && mkdir -p "$RES"
tar -C "$WORK" -xJf .gpu/payload.tar.xz
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$WORK/site" "$WORK"/whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:$WORK/site" PYTHONUNBUFFERED=1 FEDOAP_CACHE_DIR="$WORK/cache"
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"

step() {  # step NAME SECONDS CMD...: run with a limit, log to $RES/NAME.log, keep going
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" > "$RES/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - start )) s" | tee -a "$RES/steps.txt"
}

{ nvidia-smi || true; $PY -c 'import torch; print(torch.__version__, torch.version.cuda)'; } \
  > "$RES/machine.txt" 2>&1
if [ "${QUICK:-0}" = 1 ]; then
  sets=quick
  limit=900  # compiling on the CPU takes minutes
  paper=(data.image_size=32 model.width=4 model.depth=3 data.max_train_images=40
         data.max_val_images=20 data.max_test_images=20 federation.rounds=1 finetune.epochs=1
         train.compile=false)
else
  sets=paper,small
  limit=240
  paper=()
fi
# The prepared files are named after the clients: point the config's clients at them.
clients=$($PY -c "import yaml; d = yaml.safe_load(open('$WORK/data/clients.yaml'))['data'];
print('data.clients=' + yaml.safe_dump(d['clients'], default_flow_style=True).strip())")
step throughput "$limit" $PY benchmarks/gpu/throughput.py --data "$WORK/data" --sets "$sets" \
  --out "$RES/throughput.json"
step paper-fedoap 200 $PY -m fedoap.cli.main run -c configs/paper.yaml "data.root=$WORK/data" \
  "$clients" "${paper[@]}" -o "$RES/paper-fedoap" -q
if [ "${QUICK:-0}" != 1 ]; then
  step cuda-tests 90 $PY -m pytest -m cuda -q -rs -p no:cacheprovider tests/test_device.py \
    tests/test_runner.py
fi
if [ "${LONG:-0}" = 1 ]; then
  step paper-long-local 500 $PY -m fedoap.cli.main run -c configs/paper-long.yaml method=local \
    "data.root=$WORK/data" "$clients" -o "$RES/paper-long-local" -q
fi
rm -rf "$RES"/*/checkpoints
tar -C "$RES" -czf "$OUT/gpu-results.tar.gz" .
cat "$RES/steps.txt"
