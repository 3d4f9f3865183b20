"""The software and hardware a run used, for the run report."""

import datetime
import os
import platform
import socket
import subprocess
from importlib.metadata import PackageNotFoundError, version

import torch

_PACKAGES = ("lightning", "timm", "torchmetrics", "hydra-core", "wandb", "torchvision")


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def git_state(root: str) -> dict:
    """Commit and dirtiness of the tree the code ran from. Outside a git checkout (an image: its
    source is copied without .git) the commit the image was built from, VITRAIN_GIT_COMMIT,
    whose dirtiness nobody recorded; None without either."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", root, *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": os.environ.get("VITRAIN_GIT_COMMIT") or None, "git_dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None}


def nvidia_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # no driver or no GPU
        return None


def capture_environment(root: str, container: dict | None = None) -> dict:
    cuda = torch.cuda.is_available()
    nccl = None
    if cuda and hasattr(torch.cuda, "nccl"):
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # torch built without NCCL
            nccl = None
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": nccl,
        **{name.replace("-core", ""): _package_version(name) for name in _PACKAGES},
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
        "driver": nvidia_driver() if cuda else None,
        "container": container,
        **git_state(root),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return env
