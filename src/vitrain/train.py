"""Build datamodule, module, callbacks, loggers and Trainer from the config; fit; report."""

import datetime
import shutil
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import (
    Callback,
    EMAWeightAveraging,
    LearningRateMonitor,
    ProgressBar,
    TQDMProgressBar,
)
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from vitrain.checkpointing import AtomicCheckpointIO, resume_checkpoint
from vitrain.container import setup_container
from vitrain.data.bad_samples import BadSampleMonitor
from vitrain.data.batching import per_device_batch_size
from vitrain.errors import Preempted, UserError
from vitrain.faults import NonFiniteLossGuard
from vitrain.launch import job_environment, pin_ddp_children_to_this_job
from vitrain.loggers import build_loggers, finish_loggers
from vitrain.models import ViTClassifier
from vitrain.models.module import compile_mode
from vitrain.perf import SpeedMonitor
from vitrain.perf.cpu_memory import KeepFreedMemory
from vitrain.perf.run_report import build_run_report, format_summary, write_json_atomic
from vitrain.secrets import redact, redacted_argv, scrub_yaml_file
from vitrain.tune import batch_size_finder

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
    if cfg.get("cpu_keep_freed_memory"):
        callbacks.append(KeepFreedMemory())
    # Lightning's own bar redraws every step (0.4 ms of Python each on a 2-core CPU).
    refresh = cfg.get("progress_bar_refresh_rate")
    bar_on = cfg.trainer.get("enable_progress_bar") is not False
    if refresh and bar_on and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(TQDMProgressBar(refresh_rate=refresh))
    # tune.batch_size=true: first, so the batch is settled before any other callback starts.
    finder = batch_size_finder(cfg)
    if finder is not None:
        callbacks.insert(0, finder)
    return callbacks


def build_trainer(cfg: DictConfig, callbacks: list[Callback], loggers: list) -> pl.Trainer:
    check_precision(cfg.trainer.precision, str(cfg.trainer.accelerator))
    has_checkpointing = any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks)
    try:
        return instantiate(
            cfg.trainer,
            callbacks=callbacks,
            logger=loggers or False,
            # Atomic writes: a kill during a save never leaves half a checkpoint in place.
            plugins=[*(cfg.trainer.plugins or []), AtomicCheckpointIO()],
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
    try:
        datamodule = instantiate(cfg.data, _convert_="all")
    except InstantiationException as err:
        # A data module's own UserError (e.g. data.loader=bogus) reaches the user as itself,
        # not as Hydra's wrapper with a traceback.
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        raise
    datamodule.check()
    return datamodule


def build_module(cfg: DictConfig) -> ViTClassifier:
    return ViTClassifier(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        recipe=OmegaConf.to_container(cfg.recipe, resolve=True),
        global_batch_size=cfg.data.batch_size,
        compile=compile_mode(cfg.compile, cfg.trainer.accelerator) or False,
    )


def preflight(cfg: DictConfig, trainer: pl.Trainer, module: ViTClassifier) -> None:
    """Checks that need the world size or the model, done before any process is launched."""
    check_output_dir(Path(cfg.paths.output_dir), checkpoint_bytes(module, ema=cfg.recipe.ema))
    batch = per_device_batch_size(cfg.data.batch_size, trainer.world_size)
    mixing = cfg.recipe.mixup_alpha > 0 or cfg.recipe.cutmix_alpha > 0
    if mixing and batch % 2:
        raise UserError(
            f"data.batch_size={cfg.data.batch_size} gives {batch} images per device, an odd "
            "number; mixup/cutmix needs an even per-device batch: use an even multiple of "
            f"{trainer.world_size}, or recipe.mixup_alpha=0 recipe.cutmix_alpha=0."
        )


def checkpoint_bytes(module: ViTClassifier, ema: bool) -> int:
    """fp32 weights + AdamW's two moments (+ the EMA copy)."""
    params = sum(p.numel() for p in module.parameters())
    return params * 4 * (4 if ema else 3)


def check_output_dir(output_dir: Path, ckpt_bytes: int) -> None:
    """Writable, and room for best + last + the temporary file of an atomic save."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as err:
        raise UserError(
            f"the run directory {output_dir} is not writable ({err.strerror}): choose another "
            "with hydra.run.dir=/writable/path or VITRAIN_LOG_DIR=/writable/path."
        ) from None
    needed = 3 * ckpt_bytes
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise UserError(
            f"{output_dir} has {free / 1e9:.2f} GB free, but checkpoints of this model need about "
            f"{needed / 1e9:.2f} GB (best + last + one being written): free space, or write "
            "elsewhere with VITRAIN_LOG_DIR=/path/with/space."
        )


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def resolve_ckpt_path(cfg: DictConfig, output_dir: Path) -> str | None:
    """ckpt_path when given; with resume=auto, this run directory's last checkpoint."""
    if cfg.resume not in ("auto", "never"):
        raise UserError(f"resume={cfg.resume} is not one of auto, never.")
    if cfg.ckpt_path:
        return str(cfg.ckpt_path)
    last = resume_checkpoint(output_dir) if cfg.resume == "auto" else None
    if last is not None:
        print(f"resume=auto: continuing from {last}", flush=True)
    return str(last) if last else None


def scrub_hydra_files(output_dir: Path) -> None:
    """Hydra saved the config and overrides before vitrain ran: take credentials out of them."""
    for path in (output_dir / ".hydra").glob("*.yaml"):
        scrub_yaml_file(path)


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
    output_dir = Path(cfg.paths.output_dir)
    scrub_hydra_files(output_dir)
    loggers = build_loggers(cfg.get("logger"), output_dir)
    callbacks = build_callbacks(cfg, with_loggers=bool(loggers))
    callbacks += [
        BadSampleMonitor(),
        NonFiniteLossGuard(cfg.faults.on_nonfinite_loss, cfg.faults.check_every_n_steps),
    ]
    trainer = build_trainer(cfg, callbacks, loggers)
    preflight(cfg, trainer, module)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["container_detected"] = container
    with redacted_argv():  # wandb starts its run here and records the command line
        for logger in trainer.loggers:
            logger.log_hyperparams(redact(resolved))
    ckpt_path = resolve_ckpt_path(cfg, output_dir)
    status = "failed"
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        status = "interrupted" if trainer.interrupted else "finished"
    except SIGTERMException:
        status = "preempted"
        raise Preempted(
            f"stopped by a signal; checkpoint saved to {output_dir / 'checkpoints' / 'last.ckpt'}."
            f" Resume with the same command plus hydra.run.dir={output_dir}"
        ) from None
    except torch.cuda.OutOfMemoryError:
        world = trainer.world_size
        raise UserError(
            f"out of GPU memory with {cfg.data.batch_size // world} images per device "
            f"(data.batch_size={cfg.data.batch_size} over {world} devices). Lower "
            f"data.batch_size; or keep the images per update with gradient accumulation "
            f"(data.batch_size={cfg.data.batch_size // 2} trainer.accumulate_grad_batches=2); or "
            "model.grad_checkpointing=true (less memory for about a third more compute)."
        ) from None
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
            report = redact(build_run_report(cfg, trainer, module, monitor.history, container, run))
            path = write_json_atomic(report, Path(cfg.paths.output_dir) / "run_report.json")
            print(f"\n{format_summary(report)}\n  run report: {path}", flush=True)
        finish_loggers(trainer.loggers)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
