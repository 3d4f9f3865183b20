"""Wall time of a window of training steps, synchronised with the device at both ends."""

import json
from pathlib import Path

import lightning.pytorch as pl

from vitrain.perf.speed import synchronized_now


class StepWindow(pl.Callback):
    """Times training batches [start, end) of the first epoch and writes them to `path` (JSON).

    Both ends are taken at `on_train_batch_start`, after a device synchronisation, so the window
    holds exactly end - start whole iterations of Lightning's loop: fetching the batch, the
    step, the optimizer, the scheduler, logging and every callback. bench/throughput.py adds it
    with `+callbacks.step_window=...` to time the very run `train.py` makes.

    It also writes `warmup_seconds`, from the start of training to the window's start: the
    `start` warm-up steps, torch.compile's compilation included, which is what compile costs
    before it pays (docs/performance.md, "What compile costs").
    """

    def __init__(self, start: int, end: int, path: str) -> None:
        if not 0 <= start < end:
            raise ValueError(f"StepWindow needs 0 <= start < end, got {start}, {end}")
        self.start, self.end, self.path = start, end, Path(path)
        self._t0: float | None = None
        self._train_start: float | None = None
        self._images = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._train_start = synchronized_now(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.current_epoch != 0:
            return
        if batch_idx == self.start:
            self._t0 = synchronized_now(trainer)
        elif batch_idx == self.end and self._t0 is not None:
            seconds = synchronized_now(trainer) - self._t0
            warmup = None if self._train_start is None else self._t0 - self._train_start
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(
                json.dumps(
                    {
                        "steps": self.end - self.start,
                        "seconds": seconds,
                        "images": self._images,
                        "warmup_seconds": warmup,
                    }
                )
            )
        if self.start <= batch_idx < self.end:
            self._images += batch.images.shape[0]  # a shape, not a value: no sync
