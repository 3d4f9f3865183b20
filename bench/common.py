"""What every benchmark prints first: the machine, the versions and the date."""

import datetime
import logging
import os
import platform
import warnings

import lightning
import timm
import torch


def machine_header() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
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
