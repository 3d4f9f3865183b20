#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one command (one GPU; 8 min 10 s on an H200 with
# a cold compile cache): the GPU tests, then bench/throughput.py for the README table and switches.
# Every step writes under OUT (default: bench-results/) as it ends, so a cut-off run keeps what it
# finished. MODELS / BATCH / STEPS / LOADER_* shrink it (e.g. MODELS=vit_micro for a dry run on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results}
MODELS=${MODELS:-vit_s16,vit_b16,vit_l16}
BATCH=${BATCH:-256}
STEPS=${STEPS:-20}
REPEATS=${REPEATS:-1}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
bench() {  # name, then bench/throughput.py's arguments
  local name=$1
  shift
  echo "== $name: $*"
  timeout 300 "$PYTHON" bench/throughput.py --batch "$BATCH" --warmup 8 --steps "$STEPS" --repeats "$REPEATS" \
    --json "$OUT/$name.json" "$@" 2>&1 | grep -v "^  vit"
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$PYTHON" -c "import torch, lightning, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__, 'timm', timm.__version__)"
  echo "== tests marked gpu"
  timeout 240 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tail -15
} 2>&1
# The switch rows and the first compiled row use vit_b16 (else MODELS' first model).
B16=vit_b16
[[ ",$MODELS," == *",vit_b16,"* ]] || B16=${MODELS%%,*}
# In order of need, so that a run cut off at its limit keeps the most useful files.
bench eager --models "$MODELS" --precisions bf16-mixed,16-mixed --compile off
bench "compiled_$B16" --models "$B16" --precisions bf16-mixed,16-mixed --compile default
bench switches --models "$B16" --precisions bf16-mixed --fused-adamw off,on --fused-attn on,off
bench grad_ckpt --models "$B16" --precisions bf16-mixed --grad-ckpt off,on
bench tf32 --models "$B16" --precisions 32-true --matmul highest,high --batch 64
for model in ${MODELS//,/ }; do
  [[ $model == "$B16" ]] || bench "compiled_$model" --models "$model" --precisions bf16-mixed \
    --compile default
done
# The input pipelines on this machine's CPUs, normalised on its GPU (DALI rows when installed).
echo "== loader"
timeout 300 "$PYTHON" bench/loader.py --workers "${LOADER_WORKERS:-8}" --batch "$BATCH" \
  --images "${LOADER_IMAGES:-8000}" --repeats 1 2>&1
