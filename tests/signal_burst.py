"""A probe callback for train.py's process: at a global step, SIGTERM to itself every 10 ms for
a few seconds, the burst a supervisor sends while it waits (`+callbacks.burst._target_=
signal_burst.SignalBurst +callbacks.burst.step=N` with tests/ on PYTHONPATH)."""

import os
import signal
import threading
import time

from lightning.pytorch import Callback


class SignalBurst(Callback):
    def __init__(self, step: int, seconds: float = 4.0) -> None:
        self.step, self.seconds = step, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            threading.Thread(target=self._burst, daemon=True).start()

    def _burst(self) -> None:
        end = time.monotonic() + self.seconds
        while time.monotonic() < end:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
