#!/usr/bin/env bash
# The embedded engine's GPU check, in one run of under 5 minutes on a lent card (README: "On a
# GPU"). Prepare here with `make gpu-pack` (the model's config and tokenizer, and wheels of the
# few packages the device image lacks, in .gpu/ and .whl/), then run it there from the repository
# root with both carried:
#     bash benchmarks/gpu_check.sh            # writes $OUT/engine.json, $OUT/gateway-*.json
# The chat model's weights (270 MB) do not fit what travels (64 MiB), so the check builds a
# checkpoint of SmolLM2-135M's exact shape with random weights: speed does not depend on the
# values (every stream generates exactly its max_tokens with ignore_eos). Steps:
#  1. the engine alone (benchmarks.engine): 1, 8, 32 and 64 streams, bf16, CUDA graphs, against
#     model.generate;
#  2. through the gateway (uvicorn, ragline bench run): 1, 8, 32 and 64 concurrent streams,
#     TTFT p50/p99 and tokens/s per stream against the goals (200 ms, 100 tok/s).
set -euo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

MODEL=/tmp/smollm2-random
$PY - "$MODEL" <<'PYEOF'
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
out = Path(sys.argv[1])
config = AutoConfig.from_pretrained(".gpu/model")
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(out)
for f in Path(".gpu/model").iterdir():
    if not f.name.endswith(".safetensors"):
        shutil.copy(f, out / f.name)
print("random-weight checkpoint", out, sum(p.numel() for p in model.parameters()), "parameters")
PYEOF

echo "== 1. the engine alone"
timeout 150 $PY -m benchmarks.engine --device cuda --streams 1,8,32,64 --weights bfloat16 \
  --no-peers --no-prefix --model "$MODEL" --json "$OUT/engine.json" 2>&1 | grep -v "^Loading"

echo "== 2. through the gateway"
cat > /tmp/gpu-gateway.yaml <<EOF
models:
  - {name: smollm2, path: $MODEL, device: cuda, dtype: bfloat16, max_batch: 64}
EOF
$PY -m gateway.cli serve --config /tmp/gpu-gateway.yaml --port 8300 --no-usage-ledger \
  > "$OUT/gateway.log" 2>&1 &
GW=$!
trap 'kill $GW 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf http://127.0.0.1:8300/ready >/dev/null && break
  sleep 1
done
timeout 120 $PY -m gateway.cli bench run --url http://127.0.0.1:8300/v1 --model smollm2 \
  --concurrency 1,8,32,64 --requests 64 --input-len 64 --output-len 128 --no-cache \
  --out "$OUT/gateway" 2>&1 | tail -30
