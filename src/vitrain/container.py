"""Which image a run is in (NGC, vitrain's pip image, another container, the host) and what it
holds. The switches that must be equal in every image (TF32, cudnn.benchmark, variables) are
vitrain.runtime's, applied in every image alike."""

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig

from vitrain.errors import UserError

KINDS = ("auto", "ngc", "pip", "host")  # what container=... may assert
# NGC PyTorch images (nvcr.io/nvidia/pytorch:YY.MM-py3) set this variable and ship this file.
NGC_ENV = "NVIDIA_PYTORCH_VERSION"
NGC_FILE = "NGC-DL-CONTAINER-LICENSE"
# Docker and Podman leave a file at the root; Podman, systemd-nspawn, Apptainer and Kubernetes
# set a variable.
CONTAINER_FILES = (".dockerenv", "run/.containerenv")
CONTAINER_ENV = ("container", "APPTAINER_CONTAINER", "SINGULARITY_CONTAINER")
CONTAINER_ENV += ("KUBERNETES_SERVICE_HOST",)
# Variables an image may set that change speed or numerics; recorded as found, before `env` runs.
RECORDED_ENV_PREFIXES = ("CUDA_", "NCCL_", "PYTORCH_", "TORCH_", "NVIDIA_TF32_")
HOW_TO_FIX = "see docs/docker.md"


def detect_kind(environ: dict, root: str = "/") -> str:
    """ngc, pip (vitrain's pip image, VITRAIN_IMAGE=pip), other (any other container) or host."""
    root_path = Path(root)
    if environ.get(NGC_ENV) or (root_path / NGC_FILE).exists():
        return "ngc"
    if environ.get("VITRAIN_IMAGE") == "pip":
        return "pip"
    # VITRAIN_IMAGE=ngc without NGC's markers: the Dockerfile was built on another base image.
    in_container = any((root_path / f).exists() for f in CONTAINER_FILES)
    if environ.get("VITRAIN_IMAGE") or in_container or any(environ.get(k) for k in CONTAINER_ENV):
        return "other"
    return "host"


def _package(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _cudnn() -> str | None:
    number = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if not number:
        return None
    # cuDNN 9 numbers versions as major*10000 + minor*100 + patch, cuDNN 8 as major*1000 + ...
    major, rest = divmod(number, 10000) if number >= 90000 else divmod(number, 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def _nccl() -> str | None:
    try:
        return ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # a CPU-only torch, or one built without NCCL
        return None


def versions(environ: dict) -> dict:
    """The image's versions: NGC release, and the CUDA, cuDNN and NCCL that torch was built with."""
    return {
        "ngc_version": environ.get(NGC_ENV),
        "ngc_pytorch_build": environ.get("PYTORCH_BUILD_VERSION"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _package("torchvision"),
        "cuda": torch.version.cuda,
        "cudnn": _cudnn(),
        "nccl": _nccl(),
    }


def detect_container(environ: dict | None = None, root: str = "/") -> dict:
    """The detected kind, the image's name and versions, and its speed-relevant variables."""
    environ = os.environ if environ is None else environ
    return {
        "kind": detect_kind(environ, root),
        "image": environ.get("VITRAIN_IMAGE"),  # ngc or pip in vitrain's images
        "base_image": environ.get("VITRAIN_BASE_IMAGE"),  # e.g. nvcr.io/nvidia/pytorch:25.12-py3
        **versions(environ),
        "image_env": {
            k: v for k, v in sorted(environ.items()) if k.startswith(RECORDED_ENV_PREFIXES)
        },
    }


def setup_container(cfg: DictConfig | dict, environ: dict | None = None, root: str = "/") -> dict:
    """Check container.kind against the detected image; returns what was detected."""
    kind = cfg["kind"]
    if kind not in KINDS:
        raise UserError(f"container.kind={kind} is not one of {', '.join(KINDS)}.")
    info = detect_container(environ, root)
    if kind != "auto" and kind != info["kind"]:
        message = (
            f"container={kind}, but this run is in the {info['kind']} setting "
            f"(detected: {_evidence(info)}). Run it in the {kind} image "
            f"({HOW_TO_FIX}), use container=auto, or add container.strict=false to only warn."
        )
        if cfg.get("strict", True):
            raise UserError(message)
        rank_zero_warn(message)
    info["requested"] = kind
    return info


def _evidence(info: dict) -> str:
    if info["kind"] == "ngc":
        return f"NGC PyTorch {info['ngc_version'] or '(license file)'}"
    if info["image"]:
        return f"VITRAIN_IMAGE={info['image']}"
    return "a container" if info["kind"] == "other" else "no container"
