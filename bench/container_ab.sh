#!/usr/bin/env bash
# The container A/B benchmark; docker compose runs it inside the images (docs/docker.md):
#   bench/container_ab.sh run      in each image: the same short config on each data set
#   bench/container_ab.sh report   one table per data set, the pip image as the baseline, and
#                                  what each image holds (python, torch, CUDA, cuDNN, NCCL ...)
# Runs go to $VITRAIN_LOG_DIR/ab/$AB_NAME/<data>-<image>/. Settings, from the environment:
#   AB_NAME    the result directory (default: ab); a name already used is refused, never overwritten
#   AB_DATA    the data sets (default: "synthetic imagenet"): pure compute, then with the input
#              pipeline (imagenet reads /data/imagenet, the folder compose mounts from IMAGENET_DIR)
#   AB_PRESET  gpu (default): vit_b16, bf16-mixed, batch 256, 3 epochs of 200 steps;
#              cpu: vit_micro at 32 px, 10 classes (the digits), fp32, batch 64, 3 epochs of 10
#              steps: a check that the pipeline runs, not a measurement
#   AB_ARGS    more Hydra overrides for both images, after the preset (the last value wins),
#              e.g. AB_ARGS="model=vit_s16 data.batch_size=512 trainer.max_epochs=5"
set -euo pipefail
cd "$(dirname "$0")/.."

out="${VITRAIN_LOG_DIR:-logs}/ab/${AB_NAME:-ab}"
read -r -a datasets <<< "${AB_DATA:-synthetic imagenet}"
read -r -a extra <<< "${AB_ARGS:-}"
# steps: training steps per epoch; the report takes the median epoch after the first (warm-up).
case "${AB_PRESET:-gpu}" in
  gpu)
    steps=200
    preset=(model=vit_b16 trainer.precision=bf16-mixed data.batch_size=256 trainer.max_epochs=3)
    ;;
  cpu)
    steps=10
    preset=(model=vit_micro data.image_size=32 data.num_classes=10 data.batch_size=64
      trainer.precision=32-true trainer.accelerator=cpu trainer.devices=1 trainer.max_epochs=3)
    ;;
  *)
    echo "error: AB_PRESET=${AB_PRESET} is not one of gpu, cpu" >&2
    exit 2
    ;;
esac

run() {
  local image="${VITRAIN_IMAGE:?run this inside the ngc or the pip image}" data dir sized
  for data in "${datasets[@]}"; do
    dir="$out/$data-$image"
    if [[ -e "$dir" ]]; then
      echo "error: $dir exists: choose a new AB_NAME" >&2
      exit 2
    fi
    case "$data" in
      synthetic) sized=("data.train_batches=$steps" "data.val_batches=5") ;;
      *) sized=("trainer.limit_train_batches=$steps" "trainer.limit_val_batches=5") ;;
    esac
    # container=<image> asserts the image, so a run in the wrong one fails at once.
    python train.py "container=$image" "data=$data" "${sized[@]}" "${preset[@]}" \
      logger=csv callbacks=base trainer.enable_progress_bar=false "tags=[container_ab]" \
      "${extra[@]}" "hydra.run.dir=$dir"
  done
}

# What each run's image holds, from its run report: one row per run.
environments() {
  python - "$@" <<'PYTHON'
import json
import sys
from pathlib import Path

columns = ["run", "container", "base image", "NGC", "python", "torch", "torchvision", "CUDA",
           "cuDNN", "NCCL", "lightning", "timm"]
print("| " + " | ".join(columns) + " |")
print("|" + "|".join("---" for _ in columns) + "|")
for run in sys.argv[1:]:
    report = json.loads((Path(run) / "run_report.json").read_text())
    env = report["environment"]
    image = env.get("container") or {}
    cells = [Path(run).name, image.get("kind"), image.get("base_image"), image.get("ngc_version"),
             env.get("python"), env.get("torch"), env.get("torchvision"), image.get("cuda"),
             image.get("cudnn"), image.get("nccl"), env.get("lightning"), env.get("timm")]
    print("| " + " | ".join("–" if c is None else str(c) for c in cells) + " |")
PYTHON
}

report() {
  for data in "${datasets[@]}"; do
    {
      echo "## $data"
      echo
      python -m vitrain.report "$out/$data-ngc" "$out/$data-pip" --baseline container=pip \
        --csv "$out/$data.csv" --plot "$out/$data.png"
      echo
      environments "$out/$data-ngc" "$out/$data-pip"
      echo
    } | tee "$out/$data.md"
  done
}

case "${1:-}" in
  run) run ;;
  report) report ;;
  *) echo "usage: $0 run|report" >&2; exit 2 ;;
esac
