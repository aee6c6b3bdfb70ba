#!/usr/bin/env bash
# bf16 autocast vs fp32 on one real client (BUSI breast ultrasound), local training with the
# federation4 profile, three seeds each. Writes benchmarks/results/precision/{<runs>, results.md}.
#   bash benchmarks/precision/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
out=benchmarks/results/precision
mkdir -p "$out"
for seed in 0 1 2; do
  for prec in fp32 bf16; do
    dir="$out/busi-local-$prec-seed$seed"
    [ -f "$dir/summary.json" ] && continue
    fedoap run -c configs/federation4.yaml -o "$dir" --force --quiet \
      method=local seed=$seed train.precision=$prec \
      'data.clients=[{name: breast_us, path: busi_breast_us.npz}]' > /dev/null
  done
done
python benchmarks/precision/collect.py "$out" > "$out/results.md"
cat "$out/results.md"
