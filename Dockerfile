# vitrain on NVIDIA's NGC PyTorch image: torch, torchvision, CUDA, cuDNN and NCCL stay exactly as
# NVIDIA built and tested them; pip adds only vitrain's other dependencies. See docs/docker.md.
#   docker build -t vitrain:ngc .        (or: docker compose build train)
# No `# syntax=` line: BuildKit would fetch that frontend from Docker Hub for every build (which
# fails offline); the builder's own frontend reads this file.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

ARG BASE_IMAGE

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV VITRAIN_IMAGE=ngc \
    VITRAIN_BASE_IMAGE=${BASE_IMAGE} \
    PIP_CONSTRAINT=/etc/vitrain/constraints.txt \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# Pin the image's own torch and torchvision builds (exact versions: pip can then never swap them
# for PyPI wheels that bring another CUDA and NCCL) on top of NVIDIA's pins (NGC 25.03 and later).
# As PIP_CONSTRAINT, the pins also hold for any later `pip install` in this image.
RUN mkdir -p "$(dirname "${PIP_CONSTRAINT}")" \
 && { cat /etc/pip/constraint.txt 2>/dev/null || true; echo; \
      python -m pip list --format=freeze | grep -iE '^(torch|torchvision)=='; \
    } > "${PIP_CONSTRAINT}"

# Dependencies before the source, so that this layer is rebuilt only when the list changes: the
# dependencies of pyproject.toml less torch and torchvision (tests/test_docker_files.py keeps the
# two lists equal).
RUN python -m pip install --constraint "${PIP_CONSTRAINT}" \
      "lightning>=2.5" \
      "timm>=1.0.9" \
      "hydra-core>=1.3.2" \
      "wandb>=0.17" \
      "torchmetrics>=1.4" \
      "scikit-learn>=1.3" \
      "simplejpeg>=1.7" \
      "nvidia-ml-py>=12.535" \
      "tensorboardX>=2.6" \
      "matplotlib>=3.7" \
      "webdataset>=1.0"

# The host user's ids (compose passes VITRAIN_UID / VITRAIN_GID), so that the files written to
# the mounted folders belong to that user. Not UID: bash owns that name. Declared here, after
# the installs: a build argument in scope is part of every later RUN's cache key, and declared
# at the top it made each new pair of ids reinstall every dependency.
ARG VITRAIN_UID=1000
ARG VITRAIN_GID=1000
# A non-root user with those ids (Ubuntu 24.04 images already have `ubuntu` at 1000), and the
# mount points it writes to: data (digits is written there), logs, wandb, caches.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel ubuntu; fi \
 && groupadd --non-unique --gid "${VITRAIN_GID}" vitrain \
 && useradd --non-unique --uid "${VITRAIN_UID}" --gid "${VITRAIN_GID}" --create-home \
      --shell /bin/bash vitrain \
 && mkdir -p /data /workspace/logs /workspace/wandb /workspace/cache \
 && chown vitrain:vitrain /data /workspace/logs /workspace/wandb /workspace/cache

WORKDIR /workspace/vitrain
COPY pyproject.toml README.md ./
COPY src/ src/
# --no-deps: everything vitrain needs is installed above; editable, so that a checkout mounted
# over /workspace/vitrain runs as it is.
RUN python -m pip install --no-deps --editable .
COPY train.py eval.py ./
COPY conf/ conf/
COPY bench/ bench/

# Read by conf/paths/default.yaml; docker-compose.yml mounts ImageNet at /data/imagenet.
ENV VITRAIN_DATA_DIR=/data \
    VITRAIN_LOG_DIR=/workspace/logs \
    WANDB_CONFIG_DIR=/workspace/wandb/config \
    WANDB_CACHE_DIR=/workspace/wandb/cache \
    WANDB_DATA_DIR=/workspace/wandb/data \
    HF_HOME=/workspace/cache/huggingface \
    TORCH_HOME=/workspace/cache/torch \
    TRITON_CACHE_DIR=/workspace/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/workspace/cache/inductor
USER ${VITRAIN_UID}:${VITRAIN_GID}
# The commit the source came from (compose passes VITRAIN_GIT_COMMIT; the image has no .git):
# run reports record it as environment.git_commit. Last, so that a new commit rebuilds nothing.
ARG VITRAIN_GIT_COMMIT=
ENV VITRAIN_GIT_COMMIT=${VITRAIN_GIT_COMMIT}

# NVIDIA's entrypoint first: it checks the driver and sets up CUDA forward compatibility.
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "python", "train.py"]
