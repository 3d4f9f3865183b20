"""Where the run computes and how: "is this CUDA?", the torch.compile mode, and the runtime
switches (TF32, cudnn.benchmark, environment variables) of the `runtime` config group.

Each of these is decided here once; every other module asks.
"""

import os

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from vitrain.errors import UserError

CUDA_ACCELERATORS = ("cuda", "gpu")
# torch.compile's modes; `compile=true` means "default", `false` / "off" no compilation.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def accelerator_is_cuda(accelerator: str | None) -> bool:
    """Whether trainer.accelerator trains on CUDA GPUs, before a Trainer exists ("auto": when
    torch sees one)."""
    accelerator = str(accelerator)
    if accelerator in ("auto", "None"):
        return torch.cuda.is_available()
    return accelerator in CUDA_ACCELERATORS


def training_device(trainer: pl.Trainer | None) -> torch.device:
    """The device batches go to: the trainer's, or outside a Trainer (benchmarks, tests of a
    datamodule alone) the current CUDA device when there is one, else the CPU."""
    if trainer is not None:
        return trainer.strategy.root_device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def compile_mode(value: bool | str | None, accelerator: str | None = "auto") -> str | None:
    """The torch.compile mode that `runtime.compile` asks for; None: run eagerly.

    `auto` compiles ("default") where the run trains on a CUDA GPU and runs eagerly elsewhere:
    on a GPU compile pays for its minute of compiling within a short run; on a CPU it pays only
    after thousands of steps (docs/performance.md, "What compile costs").
    """
    text = str(value).lower()
    if text == "auto":
        return "default" if accelerator_is_cuda(accelerator) else None
    if value is None or value is False or text in ("false", "off", "none"):
        return None
    if value is True or text in ("true", "on"):
        return "default"
    if value not in COMPILE_MODES:
        raise UserError(
            f"runtime.compile={value} is not one of auto, off, {', '.join(COMPILE_MODES)} "
            "(torch.compile's modes; true means default)."
        )
    return str(value)


def apply_runtime_settings(cfg: DictConfig | dict, environ: dict | None = None) -> dict:
    """Set the variables of runtime.env (null unsets one), then torch's switches; returns them.

    Explicit, because images differ in their defaults (an NGC image may turn TF32 on through
    TORCH_ALLOW_TF32_CUBLAS_OVERRIDE, upstream PyTorch leaves matmuls in full fp32): a container
    A/B then measures the image, not its defaults.
    """
    environ = os.environ if environ is None else environ
    env = {str(k): None if v is None else str(v) for k, v in (cfg.get("env") or {}).items()}
    for key, value in env.items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    torch.set_float32_matmul_precision(cfg["float32_matmul_precision"])
    torch.backends.cudnn.allow_tf32 = bool(cfg["cudnn_allow_tf32"])
    torch.backends.cudnn.benchmark = bool(cfg["cudnn_benchmark"])
    return {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "env": env,
    }
