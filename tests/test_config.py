"""Every config group option and experiment composes, and what it names instantiates."""

import inspect

import lightning.pytorch as pl
import pytest
import torch
from conftest import ROOT, compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vitrain.loggers import build_loggers
from vitrain.models import create_vit
from vitrain.train import build_callbacks, build_trainer


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


def test_groups_offer_the_documented_options():
    presets = ["vit_b16", "vit_b32", "vit_l16", "vit_micro", "vit_s16", "vit_ti16"]
    assert options("model") == ["vit", *presets]
    assert {"imagenet", "synthetic", "digits"} <= set(options("data"))
    assert {"auto", "ddp"} <= set(options("strategy"))
    assert {"wandb", "csv", "tensorboard", "none"} <= set(options("logger"))
    assert "quickstart" in options("experiment")


@pytest.mark.parametrize("model", options("model"))
def test_model_option_builds_a_vit_sized_by_the_data(model):
    named = ["model.name=vit_small_patch16_224"] if model == "vit" else []  # any timm ViT
    cfg = compose_config([f"model={model}", *named, "data.image_size=64", "data.num_classes=7"])
    vit = create_vit(**cfg.model)
    assert vit.num_classes == 7
    assert vit.patch_embed.img_size == (64, 64)
    assert vit(torch.zeros(1, 3, 64, 64)).shape == (1, 7)


def test_vit_b16_with_1000_classes_has_86_57m_parameters():
    cfg = compose_config(["model=vit_b16"])
    with torch.device("meta"):
        vit = create_vit(**cfg.model)
    assert sum(p.numel() for p in vit.parameters()) == 86_567_656


@pytest.mark.parametrize("data", options("data"))
def test_data_option_instantiates(data, tmp_path):
    cfg = compose_config(
        [f"data={data}", f"data.root={tmp_path}"] if data == "imagenet" else [f"data={data}"]
    )
    datamodule = instantiate(cfg.data, _convert_="all")
    assert isinstance(datamodule, pl.LightningDataModule)
    assert datamodule.batch_size == cfg.data.batch_size


@pytest.mark.parametrize("strategy", options("strategy"))
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_strategy_and_precision_build_a_trainer(strategy, precision, tmp_path):
    cfg = compose_config(
        [
            f"strategy={strategy}",
            f"trainer.precision={precision}",
            "trainer.accelerator=cpu",
            "logger=none",
        ],
        tmp_path,
    )
    trainer = build_trainer(cfg, build_callbacks(cfg, with_loggers=False), [])
    expected = "DDPStrategy" if strategy.startswith("ddp") else "SingleDeviceStrategy"
    assert type(trainer.strategy).__name__ == expected
    assert trainer.precision == precision
    if strategy.startswith("ddp"):
        # the non-finite-loss counter stays per rank: DDP must not broadcast rank 0's buffers
        assert cfg.trainer.strategy.broadcast_buffers is False


@pytest.mark.parametrize("logger", options("logger"))
def test_logger_option_instantiates(logger, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = compose_config([f"logger={logger}"], tmp_path)
    loggers = build_loggers(cfg.logger, tmp_path)
    assert len(loggers) == (0 if logger == "none" else 1)
    if logger == "wandb":
        assert loggers[0]._wandb_init["mode"] == "offline"  # no key: never online, never a prompt
        assert loggers[0]._wandb_init["dir"] == str(tmp_path)


@pytest.mark.parametrize("callbacks", options("callbacks"))
def test_every_callback_config_instantiates(callbacks, tmp_path):
    """Each file of conf/callbacks builds its callbacks, with `enabled` forced on."""
    on = ["tune.batch_size=true", "perf.profile_steps=[5,10]"]  # settings their nodes read
    cfg = compose_config([f"callbacks={callbacks}", *on], tmp_path)
    assert cfg.callbacks
    for name, node in cfg.callbacks.items():
        settings = OmegaConf.to_container(node, resolve=True)
        settings.pop("enabled", None)
        assert isinstance(instantiate(settings), pl.Callback), name


def test_every_run_has_the_base_callbacks_and_default_adds_checkpoints(tmp_path):
    def built(option: str) -> set[str]:
        return {type(c).__name__ for c in build_callbacks(compose_config([option], tmp_path))}

    base, default = built("callbacks=base"), built("callbacks=default")
    assert {"SpeedMonitor", "BadSampleMonitor", "NonFiniteLossGuard"} <= base  # always measured
    assert base < default and "ModelCheckpoint" not in base
    assert default - base == {"ModelCheckpoint", "LearningRateMonitor"}
    assert {"StopOnSignal"} <= base  # every run stops cleanly on a signal; default also saves
    # What is switched off by its own setting is not built, and says so in the config.
    cfg = compose_config(["recipe.ema=true", "tune.batch_size=true"], tmp_path)
    names = {type(c).__name__ for c in build_callbacks(cfg)}
    assert {"EMAWeightAveraging", "PerDeviceBatchSizeFinder"} <= names - default
    assert compose_config([]).callbacks.ema.enabled is False


def test_extra_callbacks_reach_the_trainer_through_train(tmp_path):
    """train(cfg, callbacks=[...]): the seam for probes, first in the trainer's list."""
    from conftest import run_train

    class Probe(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            self.names = [type(c).__name__ for c in trainer.callbacks]

    probe = Probe()
    run_train(
        ["experiment=quickstart", "trainer.fast_dev_run=true", "logger=none"], tmp_path, [probe]
    )
    assert probe.names[0] == "Probe" and "SpeedMonitor" in probe.names


@pytest.mark.parametrize(
    "group",
    ["experiment", "debug", "recipe", "container", "runtime", "perf", "faults", "tune", "paths"],
)
def test_every_other_option_composes(group, tmp_path):
    for option in options(group):
        cfg = compose_config([f"{group}={option}"], tmp_path)
        assert cfg.model.img_size == cfg.data.image_size


def test_every_lightning_trainer_argument_is_overridable_without_plus():
    params = set(inspect.signature(pl.Trainer.__init__).parameters) - {
        "self",
        "logger",
        "callbacks",
    }
    cfg = compose_config(["trainer.max_time=00:00:10:00", "trainer.limit_val_batches=0.5"])
    assert params <= set(cfg.trainer)
    assert cfg.trainer.max_time == "00:00:10:00" and cfg.trainer.limit_val_batches == 0.5


def test_experiment_values_win_over_the_defaults():
    cfg = compose_config(["experiment=quickstart"])
    assert cfg.model.name == "vit_tiny_patch16_224" and cfg.model.kwargs.depth == 4
    assert list(cfg.tags) == ["quickstart"]
    assert cfg.data.num_classes == 10 and cfg.model.num_classes == 10


def test_paths_follow_the_project_root_not_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config([], tmp_path / "run")
    assert (
        cfg.paths.data_dir.startswith(str(ROOT)) or "VITRAIN_DATA_DIR" in __import__("os").environ
    )
    assert cfg.paths.output_dir == str(tmp_path / "run")
