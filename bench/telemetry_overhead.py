"""Cost of vitrain's speed telemetry (SpeedMonitor) per training step, on the CPU micro model.

Two measurements, both printed:
1. the hooks alone: SpeedMonitor's per-batch hooks timed in a tight loop, as a share of the
   median training step of vit_micro (the precise figure: the hooks are all it adds per step);
2. whole fits with and without the monitor, interleaved, median step time of each (the sanity
   check; on a shared CPU its noise is larger than the effect).

    python bench/telemetry_overhead.py [--repeats 5] [--batches 40]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_header, quiet_lightning  # noqa: E402

from vitrain.data import SyntheticDataModule  # noqa: E402
from vitrain.models import ViTClassifier  # noqa: E402
from vitrain.perf import SpeedMonitor  # noqa: E402

MICRO = {
    "name": "vit_tiny_patch16_224",
    "patch_size": 4,
    "img_size": 32,
    "num_classes": 10,
    "kwargs": {"embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 2.0},
}
RECIPE = {
    "optimizer": "adamw",
    "base_lr": 5e-4,
    "weight_decay": 0.05,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "fused": None,
    "for_trained_weights": False,
    "layer_decay": None,
    "warmup_epochs": 0,
    "warmup_lr": 1e-6,
    "min_lr": 1e-5,
    "label_smoothing": 0.1,
    "mixup_alpha": 0.0,
    "cutmix_alpha": 0.0,
    "mixup_prob": 1.0,
    "mixup_switch_prob": 0.5,
    "ema": False,
    "ema_decay": 0.9999,
}


class StepTimes(pl.Callback):
    """Host time between batch ends: the same definition as perf/step_time_ms."""

    def on_train_epoch_start(self, trainer, pl_module):
        self.times, self.last = [], time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


def fit(batches: int, batch_size: int, with_monitor: bool) -> float:
    """Median step time (s) of one epoch of vit_micro on synthetic data."""
    timer = StepTimes()
    callbacks = [timer, SpeedMonitor()] if with_monitor else [timer]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    module = ViTClassifier(model=MICRO, recipe=RECIPE, global_batch_size=batch_size)
    data = SyntheticDataModule(
        batch_size=batch_size, image_size=32, num_classes=10, train_batches=batches, val_batches=1
    )
    trainer.fit(module, datamodule=data)
    return statistics.median(timer.times[5:])  # after warm-up


def hook_cost(batch_size: int, calls: int = 20000) -> float:
    """Seconds SpeedMonitor's per-batch hooks take per training step."""
    monitor = SpeedMonitor()
    monitor._last_batch_end = time.perf_counter()
    monitor._wait_time, monitor._images, monitor._segment_batches = 0.0, 0, 0
    monitor._step_times = []
    batch = (torch.zeros(batch_size, 3, 32, 32), torch.zeros(batch_size, dtype=torch.long))
    start = time.perf_counter()
    for i in range(calls):
        monitor.on_train_batch_start(None, None, batch, i)
        monitor.on_train_batch_end(None, None, None, batch, i)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    quiet_lightning()
    print(machine_header())
    with_monitor, without = [], []
    for _ in range(args.repeats):  # interleaved: drifts in machine load hit both alike
        without.append(fit(args.batches, args.batch_size, with_monitor=False))
        with_monitor.append(fit(args.batches, args.batch_size, with_monitor=True))
    step = statistics.median(without)
    hooks = hook_cost(args.batch_size)
    print(
        f"vit_micro, 32 px, batch {args.batch_size}, CPU, {args.repeats} interleaved fits "
        f"of {args.batches} steps"
    )
    print("| measurement | value |\n|---|---|")
    print(f"| median step, no telemetry | {step * 1e3:.2f} ms |")
    print(f"| median step, with SpeedMonitor | {statistics.median(with_monitor) * 1e3:.2f} ms |")
    print(f"| whole-fit ratio (with / without) | {statistics.median(with_monitor) / step:.4f} |")
    print(f"| SpeedMonitor hooks per step | {hooks * 1e6:.1f} us |")
    print(f"| hooks as share of a step | {hooks / step:.4%} |")


if __name__ == "__main__":
    main()
