"""The container/ config group and vitrain.container: detection and assertion of the image."""

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


def test_auto_is_the_default_and_the_options_differ_in_the_kind_alone():
    # The A/B compares images: nothing but the asserted kind may differ with the option (the
    # speed switches are the runtime group's: tests/test_runtime.py).
    assert container_cfg().kind == "auto"
    rest = []
    for option in OPTIONS:
        cfg = OmegaConf.to_container(container_cfg(f"container={option}"))
        rest.append({k: v for k, v in cfg.items() if k != "kind"})
    assert all(r == rest[0] == {"strict": True} for r in rest)
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
