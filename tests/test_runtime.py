"""The runtime/ config group and vitrain.runtime: the switches every image applies alike, and the
"is this CUDA?" decisions every module asks."""

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf

from vitrain.container import setup_container
from vitrain.runtime import accelerator_is_cuda, apply_runtime_settings, training_device


@pytest.fixture(autouse=True)
def restore_torch_switches():
    """apply_runtime_settings changes process-wide torch state: give it back after each test."""
    saved = (
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1:]


def test_runtime_switches_are_applied(tmp_path):
    cfg = compose_config(
        [
            "runtime.float32_matmul_precision=medium",
            "runtime.cudnn_allow_tf32=false",
            "runtime.cudnn_benchmark=true",
            "+runtime.env.NCCL_DEBUG=INFO",
        ]
    )
    environ = {"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1", "NVIDIA_TF32_OVERRIDE": "0"}
    # As train() does it: what the image had set is recorded, then the switches are applied.
    info = setup_container(cfg.container, environ, str(tmp_path))
    settings = apply_runtime_settings(cfg.runtime, environ)
    assert torch.get_float32_matmul_precision() == "medium"
    assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cudnn.benchmark is True
    # Set, and unset (null): an image's TF32 variables no longer decide anything.
    assert environ == {"NCCL_DEBUG": "INFO", "CUDA_MODULE_LOADING": "LAZY"}
    assert settings["float32_matmul_precision"] == "medium"
    assert settings["env"]["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"] is None
    assert info["image_env"]["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"] == "1"


def test_default_switches():
    apply_runtime_settings(compose_config([]).runtime, {})
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cudnn.allow_tf32 is True and torch.backends.cudnn.benchmark is True


@pytest.mark.parametrize("container", ["auto", "ngc", "pip", "host"])
def test_the_switches_do_not_depend_on_the_image(container):
    runtime = OmegaConf.to_container(compose_config([f"container={container}"]).runtime)
    assert runtime == OmegaConf.to_container(compose_config([]).runtime)


def test_cuda_is_decided_from_the_accelerator_or_the_trainer():
    assert accelerator_is_cuda("cpu") is False
    assert accelerator_is_cuda("gpu") is accelerator_is_cuda("cuda") is True
    assert accelerator_is_cuda("auto") is torch.cuda.is_available()

    class Trainer:
        class strategy:  # noqa: N801
            root_device = torch.device("cuda", 3)

    assert training_device(Trainer()) == torch.device("cuda", 3)
    alone = training_device(None)  # no Trainer (a benchmark): the machine's device
    assert alone.type == ("cuda" if torch.cuda.is_available() else "cpu")
