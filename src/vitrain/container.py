"""Which image a run is in (NGC, another container, the host), and its runtime switches."""

import os
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig

from vitrain.errors import UserError

KINDS = ("auto", "ngc", "pip", "host")
# Set by NVIDIA's NGC PyTorch images (nvcr.io/nvidia/pytorch:YY.MM-py3).
NGC_ENV_MARKERS = ("NVIDIA_PYTORCH_VERSION", "PYTORCH_BUILD_VERSION")
NGC_FILE_MARKER = "/NGC-DL-CONTAINER-LICENSE"
CONTAINER_FILE_MARKERS = ("/.dockerenv", "/run/.containerenv")


def detect_container(environ: dict | None = None, root: str = "/") -> dict:
    """kind is ngc, pip (vitrain's pip image or another container) or host; image and versions."""
    environ = os.environ if environ is None else environ
    root_path = Path(root)

    def exists(marker: str) -> bool:
        return (root_path / marker.lstrip("/")).exists()

    info = {"image": environ.get("VITRAIN_IMAGE")}
    if any(environ.get(k) for k in NGC_ENV_MARKERS) or exists(NGC_FILE_MARKER):
        info["kind"] = "ngc"
        info["ngc_version"] = environ.get("NVIDIA_PYTORCH_VERSION")
        info["ngc_pytorch_build"] = environ.get("PYTORCH_BUILD_VERSION")
    elif environ.get("VITRAIN_IMAGE") or any(exists(m) for m in CONTAINER_FILE_MARKERS):
        info["kind"] = "pip"
    else:
        info["kind"] = "host"
    return info


def apply_runtime_settings(cfg: DictConfig | dict) -> None:
    """Set the switches every image must agree on before a comparison means anything."""
    for key, value in (cfg.get("env") or {}).items():
        os.environ[str(key)] = str(value)
    torch.set_float32_matmul_precision(cfg["float32_matmul_precision"])
    torch.backends.cudnn.allow_tf32 = bool(cfg["cudnn_allow_tf32"])
    torch.backends.cudnn.benchmark = bool(cfg["cudnn_benchmark"])


def setup_container(cfg: DictConfig | dict, environ: dict | None = None, root: str = "/") -> dict:
    """Check container.kind against the detected image, apply the switches; returns the facts."""
    kind = cfg["kind"]
    if kind not in KINDS:
        raise UserError(f"container={kind} is not one of {', '.join(KINDS)}.")
    info = detect_container(environ, root)
    if kind != "auto" and kind != info["kind"]:
        message = (
            f"container={kind} but this run is in the {info['kind']} setting: run it inside the "
            f"{kind} image (README 'Docker'), use container=auto, or container.strict=false."
        )
        if cfg.get("strict", True):
            raise UserError(message)
        rank_zero_warn(message)
    apply_runtime_settings(cfg)
    info["requested"] = kind
    info["settings"] = {
        "float32_matmul_precision": cfg["float32_matmul_precision"],
        "cudnn_allow_tf32": bool(cfg["cudnn_allow_tf32"]),
        "cudnn_benchmark": bool(cfg["cudnn_benchmark"]),
        "env": dict(cfg.get("env") or {}),
    }
    return info
