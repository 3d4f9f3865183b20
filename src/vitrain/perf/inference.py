"""Inference speed of a model: images/s at a batch size, and the latency of one image."""

import statistics

import lightning.pytorch as pl
import torch
from torch import nn

from vitrain.perf.speed import synchronized_now


def inference_speed(
    model: nn.Module,
    trainer: pl.Trainer,
    batch_size: int,
    image_size: int,
    warmup_batches: int,
    batches: int,
    latency_runs: int,
) -> dict:
    """Forward passes of random images on the trainer's device, at its precision (Lightning's
    predict-step context: autocast for the mixed precisions), without gradients.

    Throughput: `batches` batches of `batch_size` after `warmup_batches` untimed ones (allocator,
    cuDNN autotuning, torch.compile), timed as one stretch between two device synchronisations.
    Latency: `latency_runs` single images, each timed between synchronisations, after the same
    warm-up at batch 1. A count of 0 leaves that figure out.
    """
    device = trainer.strategy.root_device
    model = model.to(device).eval()  # Lightning's teardown moved it back to the CPU
    figures: dict = {"device": str(device), "precision": str(trainer.precision)}
    with torch.inference_mode(), trainer.precision_plugin.predict_step_context():
        images = torch.randn(batch_size, 3, image_size, image_size, device=device)
        if batches > 0:
            for _ in range(warmup_batches):
                model(images)
            start = synchronized_now(trainer)
            for _ in range(batches):
                model(images)
            seconds = synchronized_now(trainer) - start
            figures |= {
                "batch_size": batch_size,
                "timed_batches": batches,
                "images_per_s": batch_size * batches / seconds,
                "batch_time_ms": 1000 * seconds / batches,
            }
        if latency_runs > 0:
            image = images[:1]
            for _ in range(warmup_batches):
                model(image)
            times = []
            for _ in range(latency_runs):
                start = synchronized_now(trainer)
                model(image)
                times.append(1000 * (synchronized_now(trainer) - start))
            figures |= {
                "latency_runs": latency_runs,
                "latency_ms_p50": statistics.median(times),
                "latency_ms_p95": _percentile(times, 95),
            }
    return figures


def _percentile(values: list[float], percent: int) -> float:
    """The `percent`-th percentile, linear between the nearest ranks (numpy's default)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]
