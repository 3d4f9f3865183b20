"""Build datamodule, module, callbacks, loggers and Trainer from the config; fit; report.

docs/architecture.md draws the flow; each build_* function owns one part of it.
"""

import contextlib
import datetime
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import BatchSizeFinder, Callback, LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from vitrain.checkpointing import AtomicCheckpointIO, choose_checkpoint, run_checkpoints
from vitrain.config import check_required
from vitrain.container import setup_container
from vitrain.data.resolution import plan_of
from vitrain.data.sizing import per_device_batch_size
from vitrain.errors import Preempted, UserError, full_disk
from vitrain.launch import job_environment, pin_ddp_children_to_this_job
from vitrain.loggers import build_loggers, finish_loggers, record_summary, start_loggers
from vitrain.models import ViTClassifier
from vitrain.perf import SpeedMonitor
from vitrain.perf.profiler import StepProfiler
from vitrain.preemption import STOP_SIGNALS, Stopped
from vitrain.report.attempts import next_attempt, read_attempts, record_end, record_start
from vitrain.report.run_report import (
    REPORT_NAME,
    build_run_report,
    format_summary,
    hydra_choice,
    write_json_atomic,
)
from vitrain.runtime import accelerator_is_cuda, apply_runtime_settings, compile_mode
from vitrain.secrets import redact, scrub_yaml_file

log = logging.getLogger(__name__)

# Callbacks that need a logger to write to: left out of a run without one (Lightning refuses it).
NEED_A_LOGGER = (LearningRateMonitor,)


def check_precision(precision: str, accelerator: str) -> None:
    """Refuse a precision the device cannot run, instead of Lightning's silent switch."""
    precision = str(precision)
    on_cuda = accelerator_is_cuda(accelerator)
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


UNEXPECTED_SETTING = re.compile(r"got an unexpected keyword argument '(\w+)'")


def instantiate_node(node: Any, group: str | None = None, **kwargs) -> Any:
    """hydra.utils.instantiate, with a vitrain UserError raised inside a constructor reaching the
    user as itself (one line), not as Hydra's wrapper with a traceback; and, for the node of
    config group `group`, a setting its class does not take (an experiment's data.* keys with
    another data option) named as the user's error it is."""
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        unexpected = UNEXPECTED_SETTING.search(str(err.__cause__))
        if group is not None and isinstance(err.__cause__, TypeError) and unexpected:
            key, option = unexpected.group(1), hydra_choice(group, None)
            chosen = f"{group}={option}" if option else f"this {group} option"
            raise UserError(
                f"{group}.{key}={node.get(key)} is set, but {chosen} ({node.get('_target_')}) "
                f"has no such setting: choose a {group} option that has it, or remove "
                f"{group}.{key} (an experiment may set it: python train.py --cfg job shows "
                "the composed config)."
            ) from None
        raise


def build_callbacks(cfg: DictConfig, with_loggers: bool = True) -> list[Callback]:
    """Every callback of cfg.callbacks (conf/callbacks), in order; a node set to null, or with
    `enabled: false`, is left out, and so are those of NEED_A_LOGGER in a run without a logger."""
    callbacks = []
    for node in (cfg.get("callbacks") or {}).values():
        if node is None:
            continue
        settings = OmegaConf.to_container(node, resolve=True)
        if settings.pop("enabled", True) is False:
            continue
        callback = instantiate_node(settings)
        if with_loggers or not isinstance(callback, NEED_A_LOGGER):
            callbacks.append(callback)
    return callbacks


def build_trainer(cfg: DictConfig, callbacks: list[Callback], loggers: list) -> pl.Trainer:
    check_precision(cfg.trainer.precision, str(cfg.trainer.accelerator))
    has_checkpointing = any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks)
    # A training size (or batch) that changes by epoch: Lightning asks for the loaders at each
    # epoch, and the datamodule builds new ones only when the size changes.
    reload = cfg.trainer.reload_dataloaders_every_n_epochs or int(plan_of(cfg.data).varies)
    try:
        return instantiate(
            cfg.trainer,
            callbacks=callbacks,
            reload_dataloaders_every_n_epochs=reload,
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


def build_datamodule(cfg: DictConfig, stage: str = "fit") -> pl.LightningDataModule:
    """cfg.data's datamodule, checked for what the Lightning `stage` (fit, validate) reads."""
    datamodule = instantiate_node(cfg.data, group="data")
    datamodule.check(stage)
    return datamodule


def build_module(cfg: DictConfig) -> ViTClassifier:
    if cfg.recipe.for_trained_weights and not cfg.model.init_from:
        raise UserError(
            "this recipe fine-tunes trained weights (recipe.for_trained_weights=true: a low "
            "learning rate, layer decay, a short warm-up): give them with "
            "model.init_from=<vitrain checkpoint, .safetensors or .pth file>."
        )
    model = OmegaConf.to_container(cfg.model, resolve=True)
    resolution = plan_of(cfg.data)
    # Trained at other sizes than it evaluates at: the position embedding follows the input.
    model["dynamic_img_size"] = model.get("dynamic_img_size") or resolution.other_sizes
    return ViTClassifier(
        model=model,
        recipe=OmegaConf.to_container(cfg.recipe, resolve=True),
        global_batch_size=cfg.data.batch_size,
        compile=compile_mode(cfg.runtime.compile, cfg.trainer.accelerator),
        on_nonfinite_loss=cfg.faults.on_nonfinite_loss,
    )


def preflight(cfg: DictConfig, trainer: pl.Trainer, module: ViTClassifier) -> None:
    """Checks that need the world size or the model, done before any process is launched."""
    check_output_dir(Path(cfg.paths.output_dir), checkpoint_bytes(module, ema=cfg.recipe.ema))
    patch = cfg.model.patch_size
    odd_sizes = [s for s in plan_of(cfg.data).sizes(trainer.max_epochs or 1) if s % patch]
    if odd_sizes:
        raise UserError(
            f"training sizes {odd_sizes} (data.train_image_size, data.resolution_schedule) are "
            f"not multiples of model.patch_size={patch}: use a multiple of {patch} and a "
            f"resolution_schedule.step that is one."
        )
    batch = per_device_batch_size(cfg.data.batch_size, trainer.world_size)
    if module.mixes and batch % 2:
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
            f"{output_dir} has {size_text(free)} free, but checkpoints of this model need about "
            f"{size_text(needed)} (best + last + one being written): free space, or write "
            "elsewhere with VITRAIN_LOG_DIR=/path/with/space."
        )


def size_text(size: int) -> str:
    """A byte count for a person: 1000 bytes, 3.7 MB, 12.3 GB (never "0.00 GB")."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            value = size / scale
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{size} bytes"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def scrub_hydra_files(output_dir: Path) -> None:
    """Hydra saved the config and overrides before vitrain ran: take credentials out of them."""
    for path in (output_dir / ".hydra").glob("*.yaml"):
        scrub_yaml_file(path)


def train(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> dict[str, float]:
    """Fit the configured model, write run_report.json; returns the final metrics as floats.

    callbacks: more callbacks for this run (tests, benchmarks), before the configured ones.
    """
    with job_environment():
        try:
            return _train(cfg, list(callbacks))
        except Exception as err:
            full = full_disk(err)
            if full is None:
                raise
            output_dir = Path(cfg.paths.output_dir)
            newest = next(iter(run_checkpoints(output_dir / "checkpoints")), None)
            raise UserError(
                f"the disk of {output_dir} is full ({full.strerror}); every file was written "
                "whole or not at all, and the newest checkpoint is "
                f"{newest or 'none yet'}. Free space, then rerun the same command with "
                f"hydra.run.dir={output_dir} to resume."
            ) from None


def _train(cfg: DictConfig, extra_callbacks: list[Callback]) -> dict[str, float]:
    started, started_at = time.perf_counter(), utc_now()  # this attempt's
    check_required(cfg)
    try:
        pl.seed_everything(cfg.seed, workers=True)
    except (TypeError, ValueError) as err:
        raise UserError(
            f"seed={cfg.seed} is not a seed ({err}): set an integer from 0 to 4294967295, "
            "e.g. seed=42."
        ) from None
    pin_ddp_children_to_this_job()
    container = setup_container(cfg.container)
    container["settings"] = apply_runtime_settings(cfg.runtime)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg)
    output_dir = Path(cfg.paths.output_dir)
    scrub_hydra_files(output_dir)
    attempt = next_attempt(output_dir)
    loggers = build_loggers(cfg.get("logger"), output_dir, attempt)
    callbacks = [*extra_callbacks, *build_callbacks(cfg, with_loggers=bool(loggers))]
    trainer = build_trainer(cfg, callbacks, loggers)
    preflight(cfg, trainer, module)
    # Before any logger writes: a resume that cannot go ahead changes no file of the run.
    resume = choose_checkpoint(cfg, output_dir, module, datamodule.hparams.get("classes"))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["container_detected"] = container
    params = redact(resolved)
    trainer.loggers = start_loggers(trainer.loggers, params, cfg.get("logger"), output_dir)
    if trainer.is_global_zero:
        record_start(
            output_dir,
            attempt,
            started_at=started_at,
            resumed_from=str(resume.path) if resume else None,
            start_step=resume.global_step if resume else 0,
            overrides=redact(list(HydraConfig.get().overrides.task))
            if HydraConfig.initialized()
            else [],
        )
    status = "failed"
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume.path if resume else None)
        status = "interrupted" if trainer.interrupted else "finished"
    except Stopped as stop:
        status = "preempted"
        saved = f"checkpoint saved to {stop.checkpoint}" if stop.checkpoint else "no checkpoint"
        raise Preempted(
            f"{stop} at global step {trainer.global_step}; {saved}. Resume with the same command "
            f"plus hydra.run.dir={output_dir}",
            exit_code=stop.exit_code,
        ) from None
    except torch.cuda.OutOfMemoryError:
        world, batch = trainer.world_size, datamodule.batch_size  # the batch that trained
        raise UserError(
            f"out of GPU memory with {batch // world} images per device "
            f"(data.batch_size={batch} over {world} devices). Lower data.batch_size; or keep "
            "the images per update with gradient accumulation "
            f"(data.batch_size={batch // 2} trainer.accumulate_grad_batches=2); or "
            "model.grad_checkpointing=true (less memory for more compute)."
        ) from None
    finally:
        try:
            with unless_disk_full("the run report and the end of the attempt"):
                end = {
                    "status": status,
                    "finished_at": utc_now(),
                    "wall_time_s": time.perf_counter() - started,
                    "end_step": trainer.global_step,
                }
                if trainer.is_global_zero:
                    record_end(output_dir, attempt, **end)
                    write_report(cfg, trainer, module, container, attempt, end)
            with unless_disk_full("the loggers' last records"):
                finish_loggers(trainer.loggers)
        finally:
            STOP_SIGNALS.restore()  # only now: a burst of signals cannot end the run before this
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


@contextlib.contextmanager
def unless_disk_full(what: str) -> Iterator[None]:
    """At the end of an attempt a full disk costs one warning, not a second traceback on top of
    the error that ends the run."""
    try:
        yield
    except Exception as err:
        full = full_disk(err)
        if full is None:
            raise
        log.warning(f"{what} not written: {full.strerror}")


def write_report(cfg, trainer, module, container, attempt: int, end: dict) -> None:
    """run_report.json and the printed summary: the whole run (every attempt recorded in the
    run directory, every epoch of the checkpoints this attempt continued), from what the run's
    callbacks measured. end: how this attempt ended (status, finished_at, wall_time_s, ...)."""
    attempts = read_attempts(Path(cfg.paths.output_dir))
    if not any(a["attempt"] == attempt for a in attempts):  # attempts.jsonl lost or cut
        attempts.append({"attempt": attempt, **end})
    this = {**next(a for a in attempts if a["attempt"] == attempt), **end}
    run = {
        "output_dir": str(cfg.paths.output_dir),
        "started_at": attempts[0]["started_at"],
        "finished_at": this["finished_at"],
        "status": this["status"],
        # Every attempt's wall time; one killed with -9 recorded none.
        "wall_time_s": sum(a.get("wall_time_s", 0.0) for a in attempts),
    }
    monitor = next((c for c in trainer.callbacks if isinstance(c, SpeedMonitor)), None)
    finder = next((c for c in trainer.callbacks if isinstance(c, BatchSizeFinder)), None)
    profiler = next((c for c in trainer.callbacks if isinstance(c, StepProfiler)), None)
    report = build_run_report(
        cfg,
        trainer,
        module,
        monitor.history if monitor else [],
        container,
        run,
        batch_size_found=finder.optimal_batch_size if finder else None,
        profile=profiler.summary if profiler else None,
        attempts=attempts,
    )
    path = write_json_atomic(redact(report), Path(cfg.paths.output_dir) / REPORT_NAME)
    print(f"\n{format_summary(report)}\n  run report: {path}", flush=True)
    record_summary(trainer.loggers, summary_values(report["summary"]))


def summary_values(summary: dict) -> dict[str, float]:
    """The run's time to each accuracy target, as flat wandb summary keys."""
    values = {}
    for target, reached in (summary.get("time_to_acc") or {}).items():
        for field, value in (reached or {}).items():
            values[f"time_to_acc/{float(target):.0%}/{field}"] = value
    return values
