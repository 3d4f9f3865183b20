#!/usr/bin/env bash
# NVIDIA DALI for a GPU machine with no package index: its wheel (about 200 MB) and the wheels it
# needs that the device image lacks (about 70 MB: nvImageCodec, nvCOMP, nvJPEG, ...), as one
# archive cut into parts small enough to travel one per call (the device tool carries 64 MiB):
#   bench/dali_wheel.sh split   here: download them, cut the archive into .whl-dali-1/ ... -N/
#                               (git-ignored), print how to carry them
#   bench/dali_wheel.sh join    there, after the parts arrived: join them, check the sha256
#                               against the one computed here, unpack the wheels into .whl-dali/
# Carry the parts in consecutive calls while the machine is warm (each part stays there until a
# later call names it): carry=[".whl-dali-1"], then [".whl-dali-2"], ..., and with the last one
#   bench/dali_wheel.sh join && python3 -m pip install -q --no-index --no-deps --no-compile \
#     --target /tmp/site .whl-dali/*.whl .whl/*.whl
# (.whl: bench/gpu_wheels.sh; carry it in that call too).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGE=${DALI_PACKAGE:-nvidia-dali-cuda130==2.4.0}
# DALI 2.4's Requires-Dist less what the device image has (six, packaging, numpy): KINDS.md of
# the device tool lists the image's packages. nvimgcodec[all] brings nvjpeg, nvjpeg2k, nvtiff.
NEEDS=("nvidia-nvimgcodec-cu13[all]>=0.9.0,<0.10.0" "nvidia-libnvcomp-cu13==5.3.0.16"
  "astunparse>=1.6.0,<=1.6.3" "gast>=0.3.3,<=0.7.0" optree nvtx makefun "libcst~=1.8")
IN_IMAGE=(six packaging numpy pyyaml typing_extensions wheel)
PART_MB=${DALI_PART_MB:-50}  # MiB: a part and the working tree travel together, 64 MiB in all

split_wheel() {
  rm -rf .whl-dali .whl-dali-[0-9]*
  local stage
  stage=$(mktemp -d)
  python3 -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$stage" "$PACKAGE" "${NEEDS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
  local name
  for name in "${IN_IMAGE[@]}"; do rm -f "$stage/$name"-*.whl; done
  mkdir -p .whl-dali
  tar -cf .whl-dali/wheels.tar -C "$stage" .
  ls "$stage"
  rm -rf "$stage"
  (cd .whl-dali && split -b "${PART_MB}m" -d -a 1 wheels.tar part-)
  local n=0 part
  for part in .whl-dali/part-*; do
    n=$((n + 1))
    mkdir -p ".whl-dali-$n"
    mv "$part" ".whl-dali-$n/"
  done
  sha256sum .whl-dali/wheels.tar | awk '{print $1}' >".whl-dali-$n/sha256"
  rm -rf .whl-dali
  echo "$n parts of at most $PART_MB MiB: carry .whl-dali-1 ... .whl-dali-$n, one per call, then"
  echo "run bench/dali_wheel.sh join there (the last part holds the checksum)"
}

join_wheel() {
  local last got
  last=$(ls -d .whl-dali-[0-9]* | sort -t- -k3 -n | tail -1)
  rm -rf .whl-dali
  mkdir -p .whl-dali
  # shellcheck disable=SC2046  # the parts, in order
  cat $(ls .whl-dali-[0-9]*/part-* | sort -t- -k3 -n) >.whl-dali/wheels.tar
  got=$(sha256sum .whl-dali/wheels.tar | awk '{print $1}')
  [[ $got == "$(cat "$last/sha256")" ]] || { echo "checksum mismatch: a part is missing" >&2; exit 1; }
  tar -xf .whl-dali/wheels.tar -C .whl-dali && rm .whl-dali/wheels.tar
  echo "joined: $(ls .whl-dali | tr '\n' ' ')"
}

case "${1:-}" in
  split) split_wheel ;;
  join) join_wheel ;;
  *) echo "usage: $0 split|join" >&2; exit 2 ;;
esac
