#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one command (one GPU). Every stage writes under
# OUT (default: bench-results/) as it ends, so a cut-off run keeps what it finished.
#
#   STAGES   which stages, run in the order given (default: all, in this order):
#     realdata  issue 17's first figure: REAL_IMAGES (20,000) ImageNet-like 500x375 JPEGs in 100
#               classes (REAL_CLASSES) made with every CPU in REAL_ROOT, then REAL_MODELS
#               (vit_b16,vit_s16) bf16 through `python train.py data=imagenet` (fast loader, DeiT
#               recipe, data.num_workers=auto, runtime.compile=auto) for REAL_EPOCHS (3) epochs,
#               each beside the same run on data=synthetic, one report table; then
#               bench/loader.py with 1 and all workers: images/s per core, hence the cores each
#               model needs to be compute-bound
#     tests     pytest -m gpu (no host-device sync: eager and compiled)
#     mfu       B16 bf16 eager and compiled at MFU_BATCH (default 512,1024): the 40 % MFU goal
#     dali      issue 17 point 3: DALI_MODELS (REAL_MODELS' first) through data=imagenet_dali
#               data.device=gpu (DALI_DEVICE) on realdata's files, and bench/loader.py's fast and
#               dali rows with all cores; skipped when nvidia.dali does not import
#     eager     the README table's eager rows: MODELS in bf16-mixed and 16-mixed
#     compiled  its compiled rows (runtime.compile=default)
#     switches  fused AdamW, fused attention, gradient checkpointing, TF32 on B16
#     autotune  B16 bf16 with runtime.compile=max-autotune at AUTOTUNE_BATCH (default 512)
#     cudagraphs  S16 (default vit_s16) bf16, compile default vs reduce-overhead (CUDA graphs):
#               the smallest model's step is the one launch overhead shows in
#     finder    tune.batch_size=true on B16 bf16 (Lightning's BatchSizeFinder, a few steps)
#     loader    bench/loader.py on this machine's CPUs, normalised on the GPU
#     resolutions  issue 15: B16 bf16 compiled on synthetic batches at 160, 192 and 224 px
#               (images/s, MFU), and one run with a 160 -> 192 px schedule (perf/resize_step_s:
#               the first step at a new size, its compilation included)
#     profiler  bench/profiler_overhead.py on B16 bf16 eager (perf.profile_steps=[20,30]): what a
#               profiled step costs on a GPU, and the run's profile summary
#   MODELS / BATCH / STEPS / REPEATS / LOADER_* / FINDER_ARGS / REAL_* / DALI_* / RES_* (overrides)
#   shrink or grow it (a dry run on a CPU: bench/gpu_suite_dry_run.sh). tests..switches and loader
#   took 8 min 10 s on an H200; realdata, mfu, dali, autotune, cudagraphs, finder, resolutions,
#   profiler and the compiled and reduce-overhead GPU tests have not run on a GPU yet. What is
#   still missing, in order of need, in calls of under 10 minutes each:
#     STAGES=realdata bench/gpu_suite.sh          (issue 17 point 1)
#     STAGES=mfu,tests bench/gpu_suite.sh         (points 2 and 4)
#     STAGES=dali bench/gpu_suite.sh              (point 3; DALI carried, see below)
#     STAGES=compiled,autotune MODELS=vit_s16,vit_l16 B16=vit_b16 bench/gpu_suite.sh
#     STAGES=cudagraphs,finder bench/gpu_suite.sh
#     STAGES=resolutions bench/gpu_suite.sh       (issue 15; it reuses realdata's JPEGs)
#     STAGES=profiler bench/gpu_suite.sh          (and tests: test_profiler's CUDA profile)
#   The device image has torch, Lightning, torchmetrics, timm and no package index: here,
#   bench/gpu_wheels.sh makes .whl/ (hydra-core, omegaconf, antlr4, simplejpeg, webdataset,
#   braceexpand, this venv's timm) and bench/dali_wheel.sh split makes DALI's 6 parts. Each call
#   carries .whl and the next DALI part (about 55 MB in all with the working tree), so the parts
#   are there by the dali call, which joins them first; every call begins with
#     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#     export PYTHONPATH=/tmp/site:$PWD/src &&
#   and the dali call with `bench/dali_wheel.sh join && python3 -m pip install ... .whl-dali/*.whl`
#   before it (the same pip arguments; both sets of wheels in one install).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results}
STAGES=${STAGES:-realdata,tests,mfu,dali,eager,compiled,switches,autotune,cudagraphs,finder,loader,resolutions,profiler}
MODELS=${MODELS:-vit_s16,vit_b16,vit_l16}
BATCH=${BATCH:-256}
STEPS=${STEPS:-20}
REPEATS=${REPEATS:-1}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-300}
REAL_MODELS=${REAL_MODELS:-vit_b16,vit_s16}
RES_SIZES=${RES_SIZES:-160,192,224}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The switch, MFU and finder stages use B16: vit_b16 unless MODELS lacks it (then its first).
if [[ -z ${B16:-} ]]; then
  B16=vit_b16
  [[ ",$MODELS," == *",vit_b16,"* ]] || B16=${MODELS%%,*}
fi
# Compiling stages use --cold-cache: their "warm-up s" is what a new machine pays to compile.
bench() {  # name, then bench/throughput.py's arguments (later ones win: --batch may be overridden)
  local name=$1
  shift
  echo "== $name: $*"
  timeout "$BENCH_TIMEOUT" "$PYTHON" bench/throughput.py --batch "$BATCH" --warmup 8 \
    --steps "$STEPS" --repeats "$REPEATS" --json "$OUT/$name.json" "$@" 2>&1 | grep -v "^  vit"
}

train() {  # run directory name, then train.py's overrides; keeps its run_report.json in OUT
  local name=$1
  shift
  local dir
  dir=$(mktemp -d)
  echo "== train $name: $*"
  timeout "$BENCH_TIMEOUT" "$PYTHON" train.py "$@" logger=csv callbacks=base \
    trainer.enable_progress_bar=false "hydra.run.dir=$dir" >"$dir/log" 2>&1 ||
    { echo "   failed:"; tail -5 "$dir/log"; }
  mkdir -p "$OUT/runs/$name"
  [[ -f $dir/run_report.json ]] && cp "$dir/run_report.json" "$OUT/runs/$name/"
  rm -rf "$dir"
}

REAL_ROOT=${REAL_ROOT:-/tmp/vitrain-jpegs}
REAL_IMAGES=${REAL_IMAGES:-20000}
REAL_CLASSES=${REAL_CLASSES:-100}
real_folder() {  # the realdata JPEGs, made once (bench/loader.py keeps a marker of what is there)
  "$PYTHON" bench/loader.py --make-only --images "$REAL_IMAGES" --classes "$REAL_CLASSES" \
    --root "$REAL_ROOT"
}
real_run() {  # model, then the data overrides: one realdata-sized training run
  local m=$1
  shift
  # shellcheck disable=SC2086  # REAL_ARGS: more overrides, split on spaces
  train "$m-${1#data=}" "model=$m" "$@" trainer.precision=bf16-mixed "data.batch_size=$BATCH" \
    "trainer.max_epochs=${REAL_EPOCHS:-3}" "data.num_classes=$REAL_CLASSES" ${REAL_ARGS:-}
}

stage_realdata() {
  local m
  real_folder
  for m in ${REAL_MODELS//,/ }; do
    real_run "$m" data=imagenet "data.root=$REAL_ROOT"
    real_run "$m" data=synthetic "data.train_batches=$((REAL_IMAGES / BATCH))" data.val_batches=2
  done
  "$PYTHON" -m vitrain.report "$OUT/runs" 2>&1
  timeout "$BENCH_TIMEOUT" "$PYTHON" bench/loader.py --root "$REAL_ROOT" --images "$REAL_IMAGES" \
    --classes "$REAL_CLASSES" --batch "$BATCH" --workers "1,$(nproc)" --repeats 1 \
    --pipelines baseline,fast,fast+randaug,fast+3aug 2>&1
}

stage_dali() {
  if ! "$PYTHON" -c "import nvidia.dali" 2>/dev/null; then
    echo "== dali: skipped, nvidia.dali does not import (bring it with bench/dali_wheel.sh)"
    return
  fi
  local m
  real_folder
  for m in ${DALI_MODELS:-${REAL_MODELS%%,*}}; do
    real_run "$m" data=imagenet_dali "data.root=$REAL_ROOT" "data.device=${DALI_DEVICE:-gpu}"
  done
  "$PYTHON" -m vitrain.report "$OUT/runs" 2>&1
  timeout "$BENCH_TIMEOUT" "$PYTHON" bench/loader.py --root "$REAL_ROOT" --images "$REAL_IMAGES" \
    --classes "$REAL_CLASSES" --batch "$BATCH" --workers "$(nproc)" --repeats 1 \
    --pipelines baseline,fast,fast+randaug,dali,dali+randaug 2>&1
}

stage_resolutions() {
  local size
  # shellcheck disable=SC2086  # RES_ARGS: more overrides, split on spaces
  for size in ${RES_SIZES//,/ }; do
    train "$B16-$size" "model=$B16" data=synthetic "data.image_size=$size" \
      trainer.precision=bf16-mixed "data.batch_size=$BATCH" trainer.max_epochs=3 \
      data.train_batches="$STEPS" data.val_batches=1 ${RES_ARGS:-}
  done
  # shellcheck disable=SC2086
  real_folder
  train "$B16-schedule" "model=$B16" data=imagenet "data.root=$REAL_ROOT" \
    "data.num_classes=$REAL_CLASSES" trainer.precision=bf16-mixed "data.batch_size=$BATCH" \
    trainer.max_epochs=3 "trainer.limit_train_batches=$STEPS" trainer.limit_val_batches=1 \
    "data.resolution_schedule={start: ${RES_SIZES%%,*}, end: ${RES_SIZES##*,}, start_epoch: 0, end_epoch: 2, step: ${RES_STEP:-32}}" \
    ${RES_ARGS:-}
  "$PYTHON" -m vitrain.report "$OUT/runs" 2>&1
}

stage_tests() {
  echo "== tests marked gpu"
  timeout 300 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests/test_speed.py \
    tests/test_loader.py tests/test_recipes.py tests/test_profiler.py 2>&1 | tail -15
}
stage_eager() { bench eager --models "$MODELS" --precisions bf16-mixed,16-mixed --compile off; }
stage_compiled() {
  bench compiled --models "$MODELS" --precisions bf16-mixed,16-mixed --compile default --cold-cache
}
stage_switches() {
  bench switches --models "$B16" --precisions bf16-mixed --fused-adamw off,on --fused-attn on,off
  bench grad_ckpt --models "$B16" --precisions bf16-mixed --grad-ckpt off,on
  bench tf32 --models "$B16" --precisions 32-true --matmul highest,high --batch 64
}
stage_mfu() {
  bench mfu --models "$B16" --precisions bf16-mixed --compile off,default --cold-cache \
    --batch "${MFU_BATCH:-512,1024}"
}
stage_autotune() {
  bench autotune --models "$B16" --precisions bf16-mixed --compile max-autotune --cold-cache \
    --batch "${AUTOTUNE_BATCH:-512}"
}
stage_cudagraphs() {
  bench cudagraphs --models "${S16:-vit_s16}" --precisions bf16-mixed \
    --compile default,reduce-overhead --cold-cache
}
stage_finder() {
  # Its run directory (checkpoints of a large model) stays out of OUT; the log says what fit.
  echo "== finder: tune.batch_size=true, $B16 bf16-mixed"
  local dir
  dir=$(mktemp -d)
  timeout "$BENCH_TIMEOUT" "$PYTHON" train.py "model=$B16" data=synthetic data.train_batches=4 \
    data.val_batches=1 trainer.max_epochs=1 trainer.precision=bf16-mixed tune.batch_size=true \
    runtime.compile=false logger=csv callbacks=base "hydra.run.dir=$dir" ${FINDER_ARGS:-} 2>&1 |
    grep -E "tune.batch_size|Error" | tail -5
  rm -rf "$dir"
}
stage_loader() {
  echo "== loader"
  timeout "$BENCH_TIMEOUT" "$PYTHON" bench/loader.py --workers "${LOADER_WORKERS:-8}" \
    --batch "$BATCH" --images "${LOADER_IMAGES:-8000}" --repeats 1 2>&1
}
stage_profiler() {
  echo "== profiler: $B16 bf16-mixed, eager, batch $BATCH"
  timeout "$BENCH_TIMEOUT" "$PYTHON" bench/profiler_overhead.py --accelerator gpu --model "$B16" \
    --image-size 224 --batch "$BATCH" --repeats "$REPEATS" --set trainer.precision=bf16-mixed \
    --set runtime.compile=false 2>&1 | grep -E "^\||^  profile|^machine|^load"
}

for name in ${STAGES//,/ }; do
  if ! declare -F "stage_$name" >/dev/null; then
    echo "STAGES: no stage '$name' (realdata, tests, mfu, dali, eager, compiled, switches," \
      "autotune, cudagraphs, finder, loader, resolutions, profiler)"
    exit 2
  fi
done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
"$PYTHON" -c "import torch, lightning, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__, 'timm', timm.__version__)"
for name in ${STAGES//,/ }; do
  "stage_$name"
done
