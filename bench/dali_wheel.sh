#!/usr/bin/env bash
# NVIDIA DALI's GPU wheel (about 200 MB) for a GPU machine with no package index, in parts small
# enough to travel one per call (the device tool carries 64 MiB a call):
#   bench/dali_wheel.sh split   here: download the wheel, cut it into .whl-dali-1/ ... -N/
#                               (git-ignored), print the calls that carry them
#   bench/dali_wheel.sh join    there, after the parts arrived: join them into .whl-dali/*.whl
#                               and check the joined file's sha256 against the one split here
# Carry the parts in consecutive calls while the machine is warm (each part stays there until a
# later call names it), e.g. carry=[".whl-dali-1"], then [".whl-dali-2"], ..., then the last one
# with the command `bench/dali_wheel.sh join && pip install --no-deps --target /tmp/site ...`.
# DALI needs more wheels of its own (its Requires-Dist: nvimgcodec, nvcomp, nvjpeg, ...): compare
# them with the device image's packages (the device tool's KINDS.md) and carry the missing ones.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGE=${DALI_PACKAGE:-nvidia-dali-cuda130==2.4.0}
PART_MB=${DALI_PART_MB:-50}  # MiB: a part and the working tree travel together, 64 MiB in all

split_wheel() {
  rm -rf .whl-dali .whl-dali-[0-9]*
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .whl-dali "$PACKAGE" >/dev/null
  local wheel
  wheel=$(ls .whl-dali/*.whl)
  (cd .whl-dali && split -b "${PART_MB}m" -d -a 1 "$(basename "$wheel")" part-)
  local n=0 part
  for part in .whl-dali/part-*; do
    n=$((n + 1))
    mkdir -p ".whl-dali-$n"
    mv "$part" ".whl-dali-$n/"
  done
  sha256sum "$wheel" | awk '{print $1}' >".whl-dali-$n/sha256"
  basename "$wheel" >".whl-dali-$n/name"
  rm -rf .whl-dali
  echo "$n parts of at most $PART_MB MB: carry .whl-dali-1 ... .whl-dali-$n, one per call, then"
  echo "run bench/dali_wheel.sh join there (the last part holds the name and the checksum)"
}

join_wheel() {
  local last
  last=$(ls -d .whl-dali-[0-9]* | sort -t- -k3 -n | tail -1)
  mkdir -p .whl-dali
  cat $(ls .whl-dali-[0-9]*/part-* | sort -t- -k3 -n) >".whl-dali/$(cat "$last/name")"
  local got
  got=$(sha256sum .whl-dali/*.whl | awk '{print $1}')
  [[ $got == "$(cat "$last/sha256")" ]] || { echo "checksum mismatch: a part is missing" >&2; exit 1; }
  echo "joined: $(ls .whl-dali/*.whl)"
}

case "${1:-}" in
  split) split_wheel ;;
  join) join_wheel ;;
  *) echo "usage: $0 split|join" >&2; exit 2 ;;
esac
