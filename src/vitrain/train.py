"""Build datamodule, module, callbacks, loggers and Trainer from the config; fit; report."""

import datetime
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from vitrain.container import setup_container
from vitrain.data.batching import per_device_batch_size
from vitrain.errors import UserError
from vitrain.launch import job_environment, pin_ddp_children_to_this_job
from vitrain.loggers import build_loggers, finish_loggers
from vitrain.models import ViTClassifier
from vitrain.perf import SpeedMonitor
from vitrain.perf.run_report import build_run_report, format_summary, write_json_atomic

PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true")


def check_precision(precision: str, accelerator: str) -> None:
    """Refuse a precision the device cannot run, instead of Lightning's silent switch."""
    precision = str(precision)
    on_cuda = accelerator in ("cuda", "gpu") or (
        accelerator == "auto" and torch.cuda.is_available()
    )
    if precision == "16-mixed" and not on_cuda:
        raise UserError(
            "trainer.precision=16-mixed needs a CUDA GPU (fp16 autocast with a grad scaler); this "
            "run is on CPU: use trainer.precision=bf16-mixed or 32-true."
        )
    if precision.startswith("bf16") and on_cuda and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name()
        raise UserError(
            f"trainer.precision={precision} needs bfloat16, which {name} lacks: use "
            "trainer.precision=16-mixed (fp16 with a grad scaler) or 32-true."
        )


def build_callbacks(cfg: DictConfig, with_loggers: bool = True) -> list[Callback]:
    # Every run is measured, whatever the callbacks group holds.
    callbacks = [SpeedMonitor(**cfg.perf)]
    for node in (cfg.get("callbacks") or {}).values():
        callback = instantiate(node)
        # The learning rate has nowhere to go with logger=none (Lightning would refuse the run).
        if with_loggers or not isinstance(callback, LearningRateMonitor):
            callbacks.append(callback)
    if cfg.recipe.ema:
        callbacks.append(EMAWeightAveraging(decay=cfg.recipe.ema_decay))
    return callbacks


def build_trainer(cfg: DictConfig, callbacks: list[Callback], loggers: list) -> pl.Trainer:
    check_precision(cfg.trainer.precision, str(cfg.trainer.accelerator))
    has_checkpointing = any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks)
    try:
        return instantiate(
            cfg.trainer,
            callbacks=callbacks,
            logger=loggers or False,
            enable_checkpointing=cfg.trainer.enable_checkpointing
            if cfg.trainer.enable_checkpointing is not None
            else has_checkpointing,
            _convert_="all",
        )
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, MisconfigurationException | ValueError | TypeError):
            raise UserError(f"trainer: {cause}") from None
        raise


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.check()
    return datamodule


def build_module(cfg: DictConfig) -> ViTClassifier:
    return ViTClassifier(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        recipe=OmegaConf.to_container(cfg.recipe, resolve=True),
        global_batch_size=cfg.data.batch_size,
        compile=cfg.compile,
    )


def preflight(cfg: DictConfig, trainer: pl.Trainer) -> None:
    """Checks that need the world size, done before any process is launched."""
    batch = per_device_batch_size(cfg.data.batch_size, trainer.world_size)
    mixing = cfg.recipe.mixup_alpha > 0 or cfg.recipe.cutmix_alpha > 0
    if mixing and batch % 2:
        raise UserError(
            f"data.batch_size={cfg.data.batch_size} gives {batch} images per device, an odd "
            "number; mixup/cutmix needs an even per-device batch: use an even multiple of "
            f"{trainer.world_size}, or recipe.mixup_alpha=0 recipe.cutmix_alpha=0."
        )


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured model, write run_report.json; returns the final metrics as floats."""
    with job_environment():
        return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, float]:
    started, started_at = time.perf_counter(), _now()
    pl.seed_everything(cfg.seed, workers=True)
    pin_ddp_children_to_this_job()
    container = setup_container(cfg.container)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg)
    loggers = build_loggers(cfg.get("logger"))
    callbacks = build_callbacks(cfg, with_loggers=bool(loggers))
    trainer = build_trainer(cfg, callbacks, loggers)
    preflight(cfg, trainer)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["container_detected"] = container
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)
    status = "failed"
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        status = "interrupted" if trainer.interrupted else "finished"
    finally:
        if trainer.is_global_zero:
            run = {
                "output_dir": str(cfg.paths.output_dir),
                "started_at": started_at,
                "finished_at": _now(),
                "status": status,
                "wall_time_s": time.perf_counter() - started,
            }
            monitor = next(c for c in callbacks if isinstance(c, SpeedMonitor))
            report = build_run_report(cfg, trainer, module, monitor.history, container, run)
            path = write_json_atomic(report, Path(cfg.paths.output_dir) / "run_report.json")
            print(f"\n{format_summary(report)}\n  run report: {path}", flush=True)
        finish_loggers(trainer.loggers)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
