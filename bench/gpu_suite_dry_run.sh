#!/usr/bin/env bash
# bench/gpu_suite.sh's new stages, shrunk to run on a CPU in a few minutes: checks that the
# script and every command in it run, not what they measure.
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-$(mktemp -d)} STAGES=${STAGES:-realdata,dali,resolutions}
export REAL_IMAGES=64 REAL_CLASSES=4 REAL_MODELS=vit_micro REAL_EPOCHS=2 BATCH=16 STEPS=3 B16=vit_micro
export REAL_ARGS="data.image_size=32 trainer.accelerator=cpu trainer.precision=32-true"
export DALI_MODELS=vit_micro DALI_DEVICE=cpu  # DALI's CPU backend: the GPU one needs a GPU
export RES_SIZES=24,28,32 RES_STEP=4 RES_ARGS="trainer.accelerator=cpu trainer.precision=32-true"
export REAL_ROOT=${REAL_ROOT:-$(mktemp -d)/jpegs} PYTHON=${PYTHON:-python3}
bench/gpu_suite.sh
echo "dry run: $(ls "$OUT/runs" | wc -l) run reports in $OUT/runs"
