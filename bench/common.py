"""What every benchmark prints first: the machine, the versions and the date."""

import datetime
import logging
import os
import platform
import warnings
from pathlib import Path

import lightning
import timm
import torch
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]


def gpu_driver() -> str | None:
    """The NVIDIA driver's version (NVML), or None without one."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # no pynvml, no driver, no GPU: the header says nothing of a driver
        return None


def machine_header() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    driver = gpu_driver() if torch.cuda.is_available() else None
    if driver:
        device = f"{device} (driver {driver}, CUDA {torch.version.cuda})"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"machine: {platform.node()} | {device or platform.machine()} | {cpus} CPUs | "
        f"python {platform.python_version()} | torch {torch.__version__} | "
        f"lightning {lightning.__version__} | timm {timm.__version__} | "
        f"{datetime.date.today().isoformat()}"
    )


def quiet_lightning() -> None:
    """Keep Lightning's start-up chatter out of benchmark tables."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """The config `python train.py <overrides>` would get, with its run directory at output_dir."""
    from vitrain.config import compose_config as compose

    os.environ.setdefault("VITRAIN_ROOT", str(ROOT))
    return compose(ROOT / "conf", overrides, output_dir)
