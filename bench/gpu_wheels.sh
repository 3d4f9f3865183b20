#!/usr/bin/env bash
# The packages bench/gpu_suite.sh needs on the device machine that its image lacks (it has torch,
# Lightning, torchmetrics, timm, numpy, PIL, pytest, nvidia-ml-py; no package index), as wheels
# for its Python 3.12, at the versions of this checkout's .venv, so the GPU runs the code CI tests:
#   bench/gpu_wheels.sh        here: .whl/ (git-ignored; a few MB, one call's carry)
# There, first in each call that carries it (carry: [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site:$PWD/src
# DALI and its own needs (about 270 MB) travel in parts: bench/dali_wheel.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_PYTHON=${VENV_PYTHON:-.venv/bin/python}
# vitrain's imports the image lacks, and timm at the version tested here (the image has another).
PACKAGES=(hydra-core omegaconf simplejpeg webdataset braceexpand timm)
# omegaconf's parser: PyPI has only its source (pure Python), so it is built into a wheel here.
FROM_SOURCE=(antlr4-python3-runtime)

pinned() {  # NAME==VERSION for each package, as installed in this checkout's venv
  "$VENV_PYTHON" - "$@" <<'EOF'
import sys
from importlib.metadata import version

print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
EOF
}

rm -rf .whl
# shellcheck disable=SC2046  # one word per requirement
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl $(pinned "${PACKAGES[@]}")
# shellcheck disable=SC2046
python3 -m pip wheel --quiet --no-deps -w .whl $(pinned "${FROM_SOURCE[@]}")
du -sh .whl
ls .whl
