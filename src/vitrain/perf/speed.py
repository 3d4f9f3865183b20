"""Per-epoch speed telemetry: epoch time, images/s, step times, input stalls, GPU use and MFU.

Lightning's ThroughputMonitor logs per step and reads the device on the host; this callback
keeps host timestamps during the epoch and talks to the device only at segment boundaries
(epoch start and end, validation start and end): no host-device sync inside the training step.
"""

import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from vitrain.data.batch import Batch
from vitrain.perf.flops import training_flops_per_image
from vitrain.perf.metrics import key
from vitrain.perf.nvml import NvmlSampler, nvml_reader_for
from vitrain.perf.peaks import mfu, peak_flops


def synchronized_now(trainer: pl.Trainer) -> float:
    """perf_counter after the device has finished the work queued so far."""
    device = trainer.strategy.root_device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


_GATHERED = (
    "images",
    "train_time",
    "wait_time",
    "has_gpu",
    "gpu_util",
    "gpu_mem_gb",
    "gpu_power_w",
)


class SpeedMonitor(pl.Callback):
    """Measures the training loop of each epoch and logs `perf/*` on rank 0 to every logger.

    A training epoch is split into segments by validation runs; each segment's wall time is
    taken after a device synchronisation, so epoch time excludes validation and checkpointing.
    Step time is the host time between consecutive `on_train_batch_end`s: on a GPU the host runs
    ahead by at most the launch queue, so its median is the device's step time in steady state.
    `perf/first_step_s` is the price of starting: from the start of training to the end of the
    first step, device synchronised (worker start-up, the first batch, CUDA/cuDNN set-up and
    torch.compile's compilation), logged with the figures of the epoch it falls in.
    `perf/image_size` is the epoch's training size; FLOPs per image and MFU are those of that
    size. When the size changes (data.resolution_schedule), `perf/resize_step_s` times the first
    step at the new size, device synchronised at both ends (a compiled model compiles it then).

    model: the model config (conf/model), for the FLOPs per image behind MFU; None: no MFU.
    The keys it logs and how the run report summarises them: vitrain.perf.metrics. Each epoch's
    record in `history` also holds `images_seen` and `elapsed_s` (since the start of training)
    up to that epoch's end, which time-to-accuracy is computed from; a resumed run carries both
    on from its checkpoint, so they count the training of every attempt. A checkpoint saved
    inside an epoch (a stop signal's) carries that epoch's counts so far (rank 0's: the ranks'
    batches are equal), and the resumed epoch starts from them, so its figures are those of the
    whole epoch across both attempts. Not counted: the time between attempts, and what a kill
    after the last checkpoint lost.
    """

    def __init__(
        self,
        model: dict | None = None,
        nvml_interval_s: float = 0.1,
        data_wait_warning: float = 0.1,
    ) -> None:
        self.model_cfg = model
        self.nvml_interval_s = nvml_interval_s
        self.data_wait_warning = data_wait_warning
        self.history: list[dict[str, Any]] = []
        self._flops_at: dict[int, float] = {}  # FLOPs per training image, by image size
        self.peak_flops_per_device: float | None = None
        self.device_name: str | None = None
        self._sampler: NvmlSampler | None = None
        self._in_epoch = False
        self._train_start: float | None = None
        self.first_step_s: float | None = None
        self._first_step_logged = False
        self._images_seen = 0.0
        self._elapsed_before = 0.0  # training seconds of the attempts before this one
        self._interrupted: dict[str, Any] | None = None  # the checkpoint's epoch in progress
        self._last_size: int | None = None  # the training size of the previous epoch
        # Host seconds the loop has waited for batches since training started, all epochs; read
        # by StepProfiler for the data wait of its window (one measurement, two readers).
        self.data_wait_s = 0.0

    # --- set-up ---------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        device = trainer.strategy.root_device
        if device.type == "cuda":
            self.device_name = torch.cuda.get_device_name(device)
            self.peak_flops_per_device = peak_flops(self.device_name, trainer.precision)
            reader = nvml_reader_for(device.index or 0)
            if reader is not None:
                self._sampler = NvmlSampler(reader, self.nvml_interval_s)
                self._sampler.pause()
                self._sampler.start()

    def flops_per_image(self, size: int) -> float | None:
        """Training FLOPs of one image at `size` (counted once per size), None without a model."""
        if self.model_cfg is None:
            return None
        if size not in self._flops_at:
            self._flops_at[size] = training_flops_per_image({**self.model_cfg, "img_size": size})
        return self._flops_at[size]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None

    # --- timing ---------------------------------------------------------------------------
    def _open_segment(self, trainer: pl.Trainer) -> None:
        self._segment_start = self._last_batch_end = synchronized_now(trainer)
        self._segment_batches = 0
        if self._sampler is not None:
            self._sampler.resume()

    def _close_segment(self, trainer: pl.Trainer) -> None:
        if self._sampler is not None:
            self._sampler.pause()
        if self._segment_batches:  # a segment without batches holds only checkpointing
            self._train_time += synchronized_now(trainer) - self._segment_start
            self._segment_batches = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_start = synchronized_now(trainer)
        # A run resumed mid-epoch gets no on_train_epoch_start for the epoch it continues.
        self.on_train_epoch_start(trainer, pl_module)
        interrupted, self._interrupted = self._interrupted, None
        if interrupted is not None and interrupted["epoch"] == trainer.current_epoch:
            self._images = interrupted["images"]
            self._train_time = interrupted["train_time_s"]
            self._wait_time = interrupted["wait_s"]

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._backfill_epoch_metrics(trainer)
        self._in_epoch = True
        self._epoch = trainer.current_epoch
        self._train_time = self._wait_time = 0.0
        self._images = 0
        self._step_times: list[float] = []
        self._epoch_start = time.perf_counter()
        self._epoch_size: int | None = None
        self._resize_start: float | None = None
        self.resize_step_s: float | None = None
        self._open_segment(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch: Batch, batch_idx: int) -> None:
        wait = time.perf_counter() - self._last_batch_end
        self._wait_time += wait
        self.data_wait_s += wait
        if self._epoch_size is None:
            self._epoch_size = batch.images.shape[-1]  # a shape: no sync
            if self._last_size is not None and self._epoch_size != self._last_size:
                # Two synchronisations, at the first step of a new size only.
                self._resize_start = synchronized_now(trainer)

    def on_train_batch_end(
        self, trainer, pl_module, outputs: Any, batch: Batch, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        self._step_times.append(now - self._last_batch_end)
        self._last_batch_end = now
        self._images += batch.images.shape[0]  # a shape, not a value: no sync
        self._segment_batches += 1
        if self.first_step_s is None and self._train_start is not None:
            # The run's one synchronisation inside the loop, after its first step.
            self.first_step_s = synchronized_now(trainer) - self._train_start
        if self._resize_start is not None:
            self.resize_step_s = synchronized_now(trainer) - self._resize_start
            self._resize_start = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._in_epoch:
            self._close_segment(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._in_epoch:
            self._open_segment(trainer)

    # --- per-epoch figures ------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_segment(trainer)
        self._in_epoch = False
        gpu = self._sampler.window() if self._sampler is not None else None
        local = [
            float(self._images),
            self._train_time,
            self._wait_time,
            1.0 if gpu else 0.0,
            *(gpu[k] if gpu else 0.0 for k in ("gpu_util", "gpu_mem_gb", "gpu_power_w")),
        ]
        # One collective per epoch: every rank's counts, on rank 0 and the others alike.
        tensor = torch.tensor(local, dtype=torch.float64, device=trainer.strategy.root_device)
        ranks = trainer.strategy.all_gather(tensor).reshape(-1, len(_GATHERED)).cpu().tolist()
        ranks = [dict(zip(_GATHERED, r, strict=True)) for r in ranks]
        if not any(r["images"] for r in ranks):
            return  # an epoch end replayed on resume from a checkpoint written before it
        perf = self.epoch_figures(ranks, self._step_times, self._epoch_size)
        if self.first_step_s is not None and not self._first_step_logged:
            perf[key("first_step_s")] = self.first_step_s  # rank 0's (all ranks start together)
            self._first_step_logged = True
        if self.resize_step_s is not None:
            perf[key("resize_step_s")] = self.resize_step_s
        self._last_size = self._epoch_size
        self._images_seen += sum(r["images"] for r in ranks)
        record = {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "epoch_wall_s": time.perf_counter() - self._epoch_start,
            "images_seen": self._images_seen,
            "elapsed_s": self._elapsed_before + time.perf_counter() - self._train_start
            if self._train_start
            else None,
            **perf,
            **_scalar_metrics(trainer, prefix="val/"),
        }
        self.history.append(record)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(
                    {"epoch": trainer.current_epoch, **perf}, step=trainer.global_step
                )
        wait = perf[key("data_wait_frac")]
        if trainer.current_epoch > 0 and wait > self.data_wait_warning:
            rank_zero_warn(
                f"perf/data_wait_frac={wait:.2f}: the training loop waited for input "
                f"{wait:.0%} of epoch {trainer.current_epoch}; the run is input-bound. Raise "
                "data.num_workers, keep data.loader=fast, decode on the GPU with "
                "data=imagenet_dali, read local shards (data=imagenet_shards) instead of a slow "
                "file system, or use data=synthetic to see the compute-bound speed."
            )

    def epoch_figures(
        self, ranks: list[dict[str, float]], step_times: list[float], size: int | None = None
    ) -> dict:
        """Reduce the ranks' counts into the logged `perf/*` figures of an epoch at `size`."""
        world = len(ranks)
        epoch_time = max(r["train_time"] for r in ranks)
        images = sum(r["images"] for r in ranks)
        images_per_s = images / epoch_time if epoch_time > 0 else 0.0
        steps_ms = sorted(t * 1000 for t in step_times) or [0.0]
        figures = {
            "epoch_time_s": epoch_time,
            "images_per_s": images_per_s,
            "images_per_s_per_device": images_per_s / world,
            "step_time_ms": statistics.median(steps_ms),
            "step_time_p90_ms": steps_ms[min(len(steps_ms) - 1, int(0.9 * len(steps_ms)))],
            "data_wait_frac": statistics.fmean(
                r["wait_time"] / r["train_time"] if r["train_time"] > 0 else 0.0 for r in ranks
            ),
        }
        if all(r["has_gpu"] for r in ranks):
            figures["gpu_util"] = statistics.fmean(r["gpu_util"] for r in ranks)
            figures["gpu_mem_gb"] = max(r["gpu_mem_gb"] for r in ranks)
            figures["gpu_power_w"] = statistics.fmean(r["gpu_power_w"] for r in ranks)
        if size is not None:
            figures["image_size"] = size
            flops = self.flops_per_image(size)
            if flops and self.peak_flops_per_device:
                figures["mfu"] = mfu(flops, images_per_s, self.peak_flops_per_device, world)
        return {key(name): value for name, value in figures.items()}

    def _backfill_epoch_metrics(self, trainer: pl.Trainer) -> None:
        # Lightning reduces on_epoch training metrics after the callbacks' on_train_epoch_end.
        if self.history:
            self.history[-1].update(_scalar_metrics(trainer, prefix="train/"))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._backfill_epoch_metrics(trainer)

    # --- the history travels with the checkpoints ---------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every epoch's figures so far: a resumed run's history is that of the checkpoint it
        resumed from, then its own (the run report covers the whole run, not one attempt); and,
        saved inside an epoch, the images and time up to the save."""
        state: dict[str, Any] = {"history": [dict(record) for record in self.history]}
        if self._in_epoch and self._images and self._train_start is not None:
            now = time.perf_counter()
            open_segment = now - self._segment_start if self._segment_batches else 0.0
            state["in_epoch"] = {
                "epoch": self._epoch,
                "images": self._images,
                "train_time_s": self._train_time + open_segment,
                "wait_s": self._wait_time,
                "elapsed_s": self._elapsed_before + now - self._train_start,
            }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(record) for record in state_dict.get("history", [])]
        self._interrupted = state_dict.get("in_epoch")
        # Time and images to accuracy go on from where the checkpoint was: the last epoch's
        # end, or the save inside the epoch after it.
        last_epoch = self.history[-1] if self.history else {}
        self._images_seen = last_epoch.get("images_seen") or 0.0
        self._elapsed_before = (self._interrupted or last_epoch).get("elapsed_s") or 0.0


def _scalar_metrics(trainer: pl.Trainer, prefix: str) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if k.startswith(prefix) and getattr(v, "numel", lambda: 1)() == 1
    }
