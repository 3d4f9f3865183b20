"""Evaluate a checkpoint on its own: val loss, top-1 and top-5, and inference speed.

`python eval.py ckpt_path=<file> [data.root=<folder>] ...` (conf/eval.yaml, the same config groups
as training). The model is the checkpoint's, built at data.image_size (the position embedding
resampled when that differs from training) with its EMA weights when it has them (ema=false: the
raw ones). The data is read as the run validated it: conf/eval.yaml takes the image size, the
number and names of the classes, eval crop, interpolation, mean and std from the checkpoint unless
given; val/ alone is read, its class folders checked against the names (a checkpoint written before
runs recorded them: against train/'s, as in training). Lightning's
Trainer.validate computes the metrics (torchmetrics, reduced over DDP ranks); rank 0 then times the
model (vitrain.perf.inference) and writes eval_report.json in the evaluation's run directory.
"""

import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from vitrain.config import check_required
from vitrain.container import setup_container
from vitrain.data.batch import Batch
from vitrain.data.sizing import per_device_batch_size
from vitrain.errors import UserError
from vitrain.launch import job_environment, pin_ddp_children_to_this_job
from vitrain.models import ViTClassifier
from vitrain.models.weights import LoadReport, load_weights, print_report, read_run_checkpoint
from vitrain.perf.environment import capture_environment
from vitrain.perf.inference import inference_speed
from vitrain.report.run_report import hydra_choice, hydra_overrides, write_json_atomic
from vitrain.runtime import apply_runtime_settings, compile_mode
from vitrain.secrets import redact
from vitrain.train import build_datamodule, build_trainer, utc_now

SCHEMA = 1
REPORT_NAME = "eval_report.json"
# The data settings conf/eval.yaml reads from the checkpoint (the datamodule's hyper-parameters).
DATA_FACTS = (
    "image_size",
    "num_classes",
    "eval_crop_pct",
    "augment.interpolation",
    "mean",
    "std",
    "classes",
)
# None in a checkpoint written before runs recorded their class names: train/ names them then.
OPTIONAL_FACTS = ("classes",)
# torch.compile modes that capture CUDA graphs: Trainer.validate before any fit breaks them
# (pytorch issue 135892).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
METRICS = ("val/loss", "val/acc1", "val/acc5")


@functools.lru_cache(maxsize=8)
def checkpoint_data_facts(path: str) -> dict:
    """The data settings the run validated with, as conf/eval.yaml reads them."""
    facts = read_run_checkpoint(path, "ckpt_path").get("datamodule_hyper_parameters") or {}
    found = {key: _lookup(facts, key) for key in DATA_FACTS}
    missing = [key for key, value in found.items() if value is None and key not in OPTIONAL_FACTS]
    if missing:
        given = " ".join(f"data.{key}=..." for key in missing)
        raise UserError(
            f"ckpt_path={path}: its run's data settings lack {', '.join(missing)} (a run on "
            f"data=synthetic?): give them, {given}, with a data option that reads images."
        )
    return found


def _lookup(facts: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        facts = facts.get(part) if isinstance(facts, dict) else None
    return facts


class CountImages(Callback):
    """The images validated, summed over the ranks (Lightning's DistributedSampler repeats a few
    when their count does not divide by the world size; this says how many were counted)."""

    def __init__(self) -> None:
        self.images = 0

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._local = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch: Batch, *args) -> None:
        self._local += batch.images.shape[0]

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        local = torch.tensor(self._local, device=trainer.strategy.root_device)
        self.images = int(trainer.strategy.reduce(local, reduce_op="sum"))


def build_eval_module(cfg: DictConfig, checkpoint: dict) -> tuple[ViTClassifier, LoadReport]:
    """The checkpoint's model at data.image_size, with every one of its tensors from the file,
    and what loading them did."""
    hparams = checkpoint["hyper_parameters"]
    trained = hparams["model"]
    if cfg.data.num_classes != trained["num_classes"]:
        raise UserError(
            f"data.num_classes={cfg.data.num_classes}, but the model of ckpt_path={cfg.ckpt_path} "
            f"classifies {trained['num_classes']} classes: evaluate it on data of its classes (a "
            "checkpoint for other classes comes from fine-tuning, README 'After training')."
        )
    mode = compile_mode(cfg.runtime.compile, cfg.trainer.accelerator)
    if mode in CUDA_GRAPH_MODES:
        raise UserError(
            f"runtime.compile={mode} captures CUDA graphs, which Trainer.validate before any fit "
            "breaks (pytorch issue 135892): evaluate with runtime.compile=default or off."
        )
    module = ViTClassifier(
        model={**trained, "img_size": cfg.data.image_size, "init_from": None},
        recipe=hparams["recipe"],
        global_batch_size=cfg.data.batch_size,
        compile=mode,
    )
    loaded = load_weights(module.model, cfg.ckpt_path, ema=cfg.ema, setting="ckpt_path", exact=True)
    print_report(loaded)
    return module, loaded


def evaluate(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> dict[str, float]:
    """Validate the checkpoint, time the model and write eval_report.json; returns the metrics."""
    with job_environment():
        return _evaluate(cfg, list(callbacks))


def _evaluate(cfg: DictConfig, extra_callbacks: list[Callback]) -> dict[str, float]:
    started, started_at = time.perf_counter(), utc_now()
    check_required(cfg)
    checkpoint = read_run_checkpoint(cfg.ckpt_path, "ckpt_path")
    checkpoint_data_facts(str(cfg.ckpt_path))  # the data defaults exist: errors before resolving
    pl.seed_everything(cfg.seed, workers=True)
    pin_ddp_children_to_this_job()
    container = setup_container(cfg.container)
    container["settings"] = apply_runtime_settings(cfg.runtime)
    module, loaded = build_eval_module(cfg, checkpoint)  # before the data: its checks are cheaper
    datamodule = build_datamodule(cfg, stage="validate")  # val/ alone, given the class names
    counter = CountImages()
    trainer = build_trainer(cfg, [*extra_callbacks, counter], loggers=[])
    (results,) = trainer.validate(module, datamodule=datamodule)
    metrics = {key: float(results[key]) for key in METRICS}
    if trainer.is_global_zero:
        batch = per_device_batch_size(cfg.data.batch_size, trainer.world_size)
        speed = inference_speed(
            module,
            trainer,
            batch_size=batch,
            image_size=cfg.data.image_size,
            warmup_batches=cfg.speed.warmup_batches,
            batches=cfg.speed.batches,
            latency_runs=cfg.speed.latency_runs,
        )
        run = {
            "output_dir": str(cfg.paths.output_dir),
            "started_at": started_at,
            "finished_at": utc_now(),
            "wall_time_s": time.perf_counter() - started,
        }
        results = {**metrics, "images": counter.images}
        report = build_eval_report(
            cfg, trainer, module, checkpoint, loaded, run, results, speed, container
        )
        path = write_json_atomic(redact(report), Path(cfg.paths.output_dir) / REPORT_NAME)
        print(f"\n{format_eval_summary(report)}\n  eval report: {path}", flush=True)
    return metrics


def build_eval_report(
    cfg, trainer, module, checkpoint, loaded: LoadReport, run, metrics, speed, container
) -> dict:
    """eval_report.json: what was evaluated and how, its metrics and speed, and the environment
    block of run_report.json."""
    ckpt = Path(cfg.ckpt_path).resolve()
    hparams = checkpoint["hyper_parameters"]
    trained_data = checkpoint.get("datamodule_hyper_parameters") or {}
    return {
        "schema": SCHEMA,
        "run": run,
        "checkpoint": {
            "path": str(ckpt),
            # a run's checkpoints live in <run dir>/checkpoints/
            "run_dir": str(ckpt.parent.parent) if ckpt.parent.name == "checkpoints" else None,
            "epoch": checkpoint.get("epoch"),
            "global_step": checkpoint.get("global_step"),
            "weights": loaded.kind,
            "resampled": [key for key, _, _ in loaded.resampled],
        },
        "config": {
            "model": hparams["model"]["name"],
            "params": sum(p.numel() for p in module.model.parameters()),
            "image_size": cfg.data.image_size,
            "trained_image_size": trained_data.get("image_size"),
            "num_classes": cfg.data.num_classes,
            "data": hydra_choice("data", None),
            "data_root": str(cfg.data.root),
            "eval_crop_pct": cfg.data.eval_crop_pct,
            "interpolation": cfg.data.augment.interpolation,
            "precision": str(trainer.precision),
            "strategy": type(trainer.strategy).__name__,
            "accelerator": trainer.strategy.root_device.type,
            "devices": trainer.num_devices,
            "nodes": trainer.num_nodes,
            "global_batch": cfg.data.batch_size,
            "per_device_batch": cfg.data.batch_size // trainer.world_size,
            "compile": module.hparams.compile or False,
            "ema": cfg.ema,
        },
        "overrides": hydra_overrides(),
        "metrics": metrics,
        "speed": speed,
        "environment": capture_environment(cfg.paths.root_dir, container),
    }


def format_eval_summary(report: dict) -> str:
    c, m, s, k = report["config"], report["metrics"], report["speed"], report["checkpoint"]
    rows = [
        ("checkpoint", f"{k['path']} (epoch {k['epoch']}, step {k['global_step']})"),
        ("weights", k["weights"]),
        ("data", f"{c['data_root']}: {m['images']} images at {c['image_size']} px"),
        ("val/loss", f"{m['val/loss']:.4f}"),
        ("val/acc1", f"{100 * m['val/acc1']:.2f} %"),
        ("val/acc5", f"{100 * m['val/acc5']:.2f} %"),
    ]
    if "images_per_s" in s:
        rows.append(
            (
                "throughput",
                f"{s['images_per_s']:,.1f} images/s (batch {s['batch_size']}, {s['device']}, "
                f"{s['precision']})",
            )
        )
    if "latency_ms_p50" in s:
        rows.append(
            ("latency", f"p50 {s['latency_ms_p50']:.2f} ms, p95 {s['latency_ms_p95']:.2f} ms")
        )
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"  {label:<{width}}  {value}" for label, value in rows)
