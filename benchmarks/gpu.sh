#!/usr/bin/env bash
# The GPU measurements, as one command (about 6 minutes on one H200):
#   bash benchmarks/gpu.sh [OUT_DIR]        # default OUT_DIR: benchmarks/results
# Selection and the whole update at n = 1e7, 2.5e7, 1e8 and density 0.01 / 0.05, next to
# lax.top_k and one read of the vector; then a ResNet-18 (CIFAR shapes, synthetic data)
# train step on one GPU, dense vs hggtopk at 1%. Each writes JSON and prints its table.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 - <<'PY'
import jax
print("devices:", jax.devices())
assert jax.devices()[0].platform == "gpu", "benchmarks/gpu.sh is for a GPU host"
PY
python3 -m benchmarks.selection --sizes 1e7,2.5e7,1e8 --densities 0.01,0.05 \
    --methods topk,gaussian,dgcsampling,redsync,hggtopk --reps 10 --reference-reps 5 \
    --out "$out/selection_gpu.json"
python3 -m benchmarks.update --sizes 1e7,2.5e7,1e8 --densities 0.01,0.05 \
    --methods hggtopk,topk,gaussian,none --pipeline --reps 10 --topk-reps 5 \
    --out "$out/update_gpu.json"
python3 -m benchmarks.train_step --model resnet18 --batch 128 --methods hggtopk,topk \
    --steps 30 --out "$out/train_step_gpu.json"
