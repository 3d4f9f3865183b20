"""Fake run_report.json files (schema 1) for the report and notebook tests.

Kept apart from the tests so they can later be swapped for reports of real tiny training runs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

GPU_EPOCH_KEYS = ("perf/mfu", "perf/gpu_util", "perf/gpu_mem_gb", "perf/gpu_power_w")
GPU_SUMMARY_KEYS = ("mfu", "gpu_util", "gpu_mem_gb", "gpu_power_w")


def _epoch(epoch: int, images_per_s: float, epoch_time_s: float, devices: int) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "perf/epoch_time_s": epoch_time_s,
        "perf/images_per_s": images_per_s,
        "perf/images_per_s_per_device": images_per_s / devices,
        "perf/step_time_ms": 100.0,
        "perf/step_time_p90_ms": 110.0,
        "perf/data_wait_frac": 0.02,
        "perf/mfu": 0.31,
        "perf/gpu_util": 97.0,
        "perf/gpu_mem_gb": 40.1,
        "perf/gpu_power_w": 600.0,
        "train/loss_epoch": 2.3 - 0.1 * epoch,
        "val/loss": 2.1 - 0.1 * epoch,
        "val/acc1": 0.4 + 0.05 * epoch,
        "val/acc5": 0.8,
    }


BASE: dict[str, Any] = {
    "schema": 1,
    "run": {
        "output_dir": "/tmp/run",
        "started_at": "2026-11-26T10:00:00+00:00",
        "finished_at": "2026-11-26T10:01:00+00:00",
        "status": "finished",
    },
    "config": {
        "model": "vit_b16",
        "model_name": "vit_base_patch16_224",
        "params": 86567656,
        "image_size": 224,
        "num_classes": 1000,
        "data": "imagenet",
        "precision": "bf16-mixed",
        "strategy": "DDPStrategy",
        "accelerator": "cuda",
        "devices": 8,
        "nodes": 1,
        "global_batch": 1024,
        "per_device_batch": 128,
        "container": "ngc",
        "compile": False,
        "max_epochs": 3,
        "seed": 42,
        "tags": [],
    },
    "overrides": ["model=vit_b16", "trainer.precision=bf16-mixed"],
    "environment": {
        "python": "3.11.7",
        "torch": "2.5.0",
        "cuda": "12.4",
        "cudnn": None,
        "nccl": None,
        "lightning": "2.6.6",
        "timm": "1.0.31",
        "gpus": ["NVIDIA H100 80GB HBM3"] * 8,
        "driver": None,
        "container": {"kind": "ngc", "image": "nvcr.io/nvidia/pytorch:25.01-py3"},
        "git_commit": "abc",
        "git_dirty": False,
        "hostname": "h",
        "cpu_count": 2,
        "date": "2026-11-26T10:00:00+00:00",
    },
    "epochs": [],
    "summary": {
        "epochs_run": 3,
        "epoch_time_s": 12.0,
        "images_per_s": 910.0,
        "images_per_s_per_device": 113.75,
        "step_time_ms": 99.0,
        "data_wait_frac": 0.02,
        "mfu": 0.31,
        "gpu_util": 97.0,
        "gpu_mem_gb": 40.1,
        "gpu_power_w": 600.0,
        "best_val_acc1": 0.5,
        "wall_time_s": 50.0,
        "projected_wall_time_s": 3600.0,
    },
}


def make_report(
    *,
    config: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    gpu: bool = True,
    **summary: Any,
) -> dict[str, Any]:
    """A schema-1 report: `config` updates config, `overrides` replaces the command-line
    overrides, keyword args update summary.

    images_per_s also sets the per-epoch curve; gpu=False drops every GPU/MFU key, as a CPU run.
    """
    report = copy.deepcopy(BASE)
    if not gpu:
        report["config"].update(accelerator="cpu", devices=1)
        report["environment"].update(gpus=[], cuda=None)
    report["config"].update(config or {})
    if overrides is not None:
        report["overrides"] = list(overrides)
    s = report["summary"]
    s.update(summary)
    devices = report["config"]["devices"]
    if "images_per_s_per_device" not in summary:
        s["images_per_s_per_device"] = s["images_per_s"] / devices
    first = 0.9  # the first epoch is slower (warm-up, compilation), as in real runs
    report["epochs"] = [
        _epoch(i, s["images_per_s"] * (first if i == 0 else 1.0), s["epoch_time_s"], devices)
        for i in range(s["epochs_run"])
    ]
    if not gpu:
        for key in GPU_SUMMARY_KEYS:
            s.pop(key, None)
        for epoch in report["epochs"]:
            for key in GPU_EPOCH_KEYS:
                epoch.pop(key)
    return report


def write_fake_report(
    run_dir: str | Path,
    *,
    config: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    gpu: bool = True,
    **summary: Any,
) -> Path:
    """Write make_report(...) as run_dir/run_report.json (dirs created); returns the file."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    report = make_report(config=config, overrides=overrides, gpu=gpu, **summary)
    report["run"]["output_dir"] = str(run_dir.resolve())
    file = run_dir / "run_report.json"
    file.write_text(json.dumps(report, indent=1))
    return file
