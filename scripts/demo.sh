#!/usr/bin/env bash
# Sets everything up, then runs the main job on the embedded store: generates a series of
# checkpoints, pushes them as versions, shows status, log, diff and stats, pulls one back and
# checks it, and copies the versions to a second store.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
export CHUNKSTORE_STORE="$PWD/demo-data/store"   # an embedded store of its own
SIZE_MB="${DEMO_SIZE_MB:-128}"

run() { printf '\n$'; printf ' %q' "$@"; printf '\n'; "$@"; }

rm -rf demo-data
echo "generating 3 checkpoints of ${SIZE_MB} MB (bf16 safetensors, 10% of tensors change per step)"
python -c "
from pathlib import Path
from chunkstore.synthetic import make_series
make_series(Path('demo-data/ckpts'), versions=3, size_mb=${SIZE_MB}, dtype='bf16')"

run chunkstore push demo-data/ckpts/step-1000 --repo demo-model -m "step 1000" --tag v1 \
    --param lr=3e-4 --param batch=64 --metric loss=2.31
run chunkstore push demo-data/ckpts/step-2000 --repo demo-model -m "step 2000" --tag v2 \
    --param lr=3e-4 --param batch=64 --metric loss=2.05
run chunkstore status demo-data/ckpts/step-3000 --repo demo-model --tensors
run chunkstore push demo-data/ckpts/step-3000 --repo demo-model -m "step 3000" --tag v3 \
    --param lr=1e-4 --param batch=64 --metric loss=1.97
run chunkstore log demo-model
run chunkstore diff demo-model@v1 demo-model@v3
run chunkstore diff demo-model@v2 demo-model@v3 --tensors
run chunkstore stats
run chunkstore pull demo-model@v1 demo-data/restored
run chunkstore verify
cmp demo-data/ckpts/step-1000/model.safetensors demo-data/restored/model.safetensors
# Another store (a team's cluster, say) gets v2 with its history, then only what v3 adds.
run chunkstore copy demo-model@v2 --to demo-data/shared
run chunkstore copy demo-model --to demo-data/shared
run chunkstore log demo-model --store demo-data/shared
echo
echo "demo-model@v1 pulled back byte-identical; the store is in demo-data/store"
