#!/usr/bin/env bash
# The container A/B benchmark; docker compose runs it inside the images (docs/docker.md):
#   bench/container_ab.sh run      in each image: the same short config on each data set
#   bench/container_ab.sh report   one table per data set, the pip image as the baseline
# Runs go to $VITRAIN_LOG_DIR/ab/$AB_NAME/<data>-<image>/. Settings, from the environment:
#   AB_NAME  the result directory (default: ab); a name already used is refused, never overwritten
#   AB_DATA  the data sets (default: "synthetic imagenet"): pure compute, then with the input pipeline
#   AB_ARGS  more Hydra overrides for both images, after the defaults below (the last value wins),
#            e.g. AB_ARGS="model=vit_s16 data.batch_size=512 trainer.max_epochs=5"
set -euo pipefail
cd "$(dirname "$0")/.."

out="${VITRAIN_LOG_DIR:-logs}/ab/${AB_NAME:-ab}"
read -r -a datasets <<< "${AB_DATA:-synthetic imagenet}"
read -r -a extra <<< "${AB_ARGS:-}"
steps=200  # training steps per epoch; the report takes the median epoch after the first (warm-up)

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
    python train.py "container=$image" "data=$data" "${sized[@]}" \
      model=vit_b16 trainer.precision=bf16-mixed data.batch_size=256 trainer.max_epochs=3 \
      logger=csv callbacks=base "tags=[container_ab]" \
      "${extra[@]}" "hydra.run.dir=$dir"
  done
}

report() {
  for data in "${datasets[@]}"; do
    echo "## $data"
    python -m vitrain.report "$out/$data-ngc" "$out/$data-pip" --baseline container=pip \
      --csv "$out/$data.csv" --plot "$out/$data.png" | tee "$out/$data.md"
  done
}

case "${1:-}" in
  run) run ;;
  report) report ;;
  *) echo "usage: $0 run|report" >&2; exit 2 ;;
esac
