#!/usr/bin/env bash
# Issue #3's GPU check, as one short script (the GPU machine is lent for minutes, not hours):
#   1. the engine alone vs plain `generate` (static batch) on SmolLM2-135M-Instruct's architecture in
#      bfloat16 at 1, 16, 64, 128 users, 64 tokens per request;
#   2. structured output (xgrammar JSON schema) vs plain, 32 users, on the GPU;
#   3. the same engine with 4-bit bitsandbytes at 1 and 64 users.
# The real weights can't travel to the GPU machine (over its transfer limit), so the weights are
# random with the real config: same shapes, same speed.
#   bash bench/gpu_check.sh CONFIG_DIR [WHEEL_DIR]     (results under $OUT or bench/results/gpu)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
config=$1
wheels=${2:-}
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheels"/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
quiet() { grep -v -E "it/s\]|Warning|warn\(" | tail -"$1"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  nproc; } 2>&1 | tee "$out/machine.txt"
timeout 150 python3 -m bench.engine_bench --random-weights-from "$config" --device cuda --dtype bfloat16 \
  --users 1,16,64,128 --requests-per-user 2 --max-tokens 64 --budget-seconds 140 \
  --json "$out/engine-bf16.json" 2>&1 >/dev/null | quiet 30
timeout 60 python3 -m bench.structured_check --random-weights-from "$config" --device cuda --dtype bfloat16 \
  --users 32 --max-tokens 64 --json "$out/structured.json" 2>&1 >/dev/null | quiet 6
timeout 75 python3 -m bench.engine_bench --random-weights-from "$config" --device cuda --dtype bfloat16 \
  --quantization 4bit --users 1,64 --requests-per-user 2 --max-tokens 64 --budget-seconds 65 \
  --no-plain-generate --json "$out/engine-4bit.json" 2>&1 >/dev/null | quiet 12
ls -la "$out"
