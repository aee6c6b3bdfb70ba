#!/usr/bin/env bash
# Build the one file a GPU machine without the data needs (run on a machine with ../shared/data):
# CONFIG's clients preprocessed at its image size (`fedoap data prepare`) and the MONAI and
# Opacus wheels (the GPU machine has torch but neither), in .gpu/payload.tar.xz. The npz files
# are stored uncompressed and the tar is xz -9e compressed. configs/paper.yaml (128x128, the
# default; for paper.sh): 48 MB, against 56 MB for zlib-compressed npz. configs/federation4.yaml
# (96x96; for trust.sh): 25 MB. The repository's tracked files travel too (about 30 MB);
# together they must stay under the tool's 64 MiB. Takes about 4 minutes on 2 cores.
#   bash benchmarks/gpu/pack.sh [CONFIG]
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
CONFIG=${1:-configs/paper.yaml}
rm -rf .gpu
mkdir -p .gpu/payload
fedoap data prepare -c "$CONFIG" -o .gpu/payload/data
for pkg in monai opacus; do
  version=$(python -c "import $pkg; print($pkg.__version__)")
  python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .gpu/payload/whl "$pkg==$version"
done
python - <<'PY'
import glob

import numpy as np

for f in glob.glob(".gpu/payload/data/*.npz"):
    arrays = dict(np.load(f, allow_pickle=False))
    np.savez(f, **arrays)  # uncompressed: xz below compresses raw pixels better than zlib
PY
tar -C .gpu/payload -cf - . | xz -9e -T2 > .gpu/payload.tar.xz
rm -rf .gpu/payload
du -h .gpu/payload.tar.xz
