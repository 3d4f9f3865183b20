"""The container/ config group and vitrain.container: detection, assertion, runtime switches."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from vitrain.config import register_configs
from vitrain.container import detect_container, setup_container
from vitrain.errors import UserError

CONF = Path(__file__).resolve().parents[1] / "conf"
OPTIONS = ("auto", "ngc", "pip", "host")
NGC_ENV = {"NVIDIA_PYTORCH_VERSION": "25.12", "PYTORCH_BUILD_VERSION": "2.10.0a0+b4e4ee81d3"}


def container_cfg(*overrides: str):
    """cfg.container as `python train.py <overrides>` composes it."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides)).container


@pytest.fixture(autouse=True)
def restore_torch_switches():
    """setup_container changes process-wide torch state: give it back after each test."""
    saved = (
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1:]


@pytest.fixture
def root(tmp_path):
    """An empty filesystem root: no container marker files unless a test adds them."""
    return tmp_path


def touch(root: Path, marker: str) -> None:
    (root / marker).parent.mkdir(parents=True, exist_ok=True)
    (root / marker).touch()


@pytest.mark.parametrize(
    ("environ", "markers", "kind"),
    [
        ({}, [], "host"),
        (NGC_ENV, [], "ngc"),
        ({}, ["NGC-DL-CONTAINER-LICENSE"], "ngc"),  # the file alone, variables cleared
        ({"VITRAIN_IMAGE": "ngc", **NGC_ENV}, [".dockerenv"], "ngc"),
        ({"VITRAIN_IMAGE": "pip"}, [".dockerenv"], "pip"),
        ({}, [".dockerenv"], "other"),  # Docker
        ({}, ["run/.containerenv"], "other"),  # Podman
        ({"container": "podman"}, [], "other"),
        ({"APPTAINER_CONTAINER": "/x.sif"}, [], "other"),
        ({"VITRAIN_IMAGE": "ngc"}, [], "other"),  # the Dockerfile built on a non-NGC base
    ],
)
def test_detection(root, environ, markers, kind):
    for marker in markers:
        touch(root, marker)
    assert detect_container(environ, str(root))["kind"] == kind


def test_detection_records_image_and_versions(root):
    environ = {**NGC_ENV, "VITRAIN_IMAGE": "ngc", "VITRAIN_BASE_IMAGE": "nvcr.io/x:25.12-py3"}
    environ |= {"NCCL_IB_DISABLE": "1", "CUDA_VERSION": "13.1.0", "HOME": "/home/me"}
    info = detect_container(environ, str(root))
    assert info["image"] == "ngc" and info["base_image"] == "nvcr.io/x:25.12-py3"
    assert info["ngc_version"] == "25.12"
    assert info["ngc_pytorch_build"] == NGC_ENV["PYTORCH_BUILD_VERSION"]
    assert info["torch"] == torch.__version__ and info["cuda"] == torch.version.cuda
    if torch.backends.cudnn.is_available():
        assert info["cudnn"].split(".")[0] == str(torch.backends.cudnn.version())[0]
    # Only the variables that change speed or numerics, as the image set them.
    assert info["image_env"] == {
        "CUDA_VERSION": "13.1.0",
        "NCCL_IB_DISABLE": "1",
        "PYTORCH_BUILD_VERSION": NGC_ENV["PYTORCH_BUILD_VERSION"],
    }


@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_composes(option):
    cfg = container_cfg(f"container={option}")
    assert cfg.kind == option and cfg.strict is True


def test_auto_is_the_default_and_every_option_has_the_same_switches():
    # The A/B compares images: the switches must not differ with the option.
    assert container_cfg().kind == "auto"
    switches = []
    for option in OPTIONS:
        cfg = OmegaConf.to_container(container_cfg(f"container={option}"))
        switches.append({k: v for k, v in cfg.items() if k != "kind"})
    assert all(s == switches[0] for s in switches)
    assert sorted(p.stem for p in (CONF / "container").glob("*.yaml")) == sorted(OPTIONS)


@pytest.mark.parametrize(("option", "environ"), [("ngc", {}), ("pip", {}), ("host", NGC_ENV)])
def test_wrong_image_is_a_user_error_naming_value_and_fix(root, option, environ):
    with pytest.raises(UserError) as err:
        setup_container(container_cfg(f"container={option}"), dict(environ), str(root))
    message = str(err.value)
    assert f"container={option}" in message
    assert "container=auto" in message and "container.strict=false" in message


def test_not_strict_warns_and_goes_on(root):
    cfg = container_cfg("container=ngc", "container.strict=false")
    with pytest.warns(UserWarning, match="container=ngc, but this run is in the host setting"):
        info = setup_container(cfg, {}, str(root))
    assert info["kind"] == "host" and info["requested"] == "ngc"


@pytest.mark.parametrize(
    ("option", "environ", "markers"),
    [
        ("auto", {}, []),
        ("host", {}, []),
        ("ngc", NGC_ENV, []),
        ("ngc", {}, ["NGC-DL-CONTAINER-LICENSE"]),
        ("pip", {"VITRAIN_IMAGE": "pip"}, [".dockerenv"]),
    ],
)
def test_right_image_passes(root, option, environ, markers):
    for marker in markers:
        touch(root, marker)
    info = setup_container(container_cfg(f"container={option}"), dict(environ), str(root))
    assert info["requested"] == option
    json.dumps(info)  # it goes into the wandb config and run_report.json


def test_unknown_kind_is_a_user_error(root):
    with pytest.raises(UserError, match="container.kind=docker is not one of"):
        setup_container(container_cfg("container.kind=docker"), {}, str(root))


def test_runtime_switches_are_applied(root):
    cfg = container_cfg(
        "container.float32_matmul_precision=medium",
        "container.cudnn_allow_tf32=false",
        "container.cudnn_benchmark=true",
        "+container.env.NCCL_DEBUG=INFO",
    )
    environ = {"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1", "NVIDIA_TF32_OVERRIDE": "0"}
    info = setup_container(cfg, environ, str(root))
    assert torch.get_float32_matmul_precision() == "medium"
    assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cudnn.benchmark is True
    # Set, and unset (null): an image's TF32 variables no longer decide anything.
    assert environ == {"NCCL_DEBUG": "INFO", "CUDA_MODULE_LOADING": "LAZY"}
    assert info["settings"]["float32_matmul_precision"] == "medium"
    assert info["settings"]["env"]["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"] is None
    # What the image had set is recorded before it was changed.
    assert info["image_env"]["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"] == "1"


def test_default_switches(root):
    setup_container(container_cfg(), {}, str(root))
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cudnn.allow_tf32 is True and torch.backends.cudnn.benchmark is True
