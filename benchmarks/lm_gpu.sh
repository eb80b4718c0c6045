#!/usr/bin/env bash
# GPT-2 small train steps on the GPUs of one host, dense AdamW vs hggtopk at 1% (Adam
# before the compressor), as one command:
#   bash benchmarks/lm_gpu.sh [LOG_DIR]        # default LOG_DIR: logs/lm_gpu
# Two python -m train.lm runs through train.compare (bytes of the offline stdlib corpus,
# so no download; 124M parameters with GPT-2's BPE, 86M with bytes), 1024-token windows,
# bfloat16 activations, 300 steps each; then each run's time breakdown (timing.json:
# step, compute, compressor update, exchange + update, dense all-reduce alone, medians of
# 20 rounds) goes into LOG_DIR/summary.md with validation loss and tokens/s.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-logs/lm_gpu}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 - <<'PY'
import jax
print("devices:", jax.devices())
assert jax.devices()[0].platform == "gpu", "benchmarks/lm_gpu.sh is for a GPU host"
PY
python3 -m train.compare --task lm --compressors none,hggtopk --densities 0.01 \
    --model gpt2-small --seq-len 1024 --batch-size 32 --eval-batch-size 32 \
    --compute-dtype bfloat16 --lr 6e-4 --steps 300 --warmup-steps 30 --eval-every 300 \
    --log-every 20 --profile --log-dir "$out"
