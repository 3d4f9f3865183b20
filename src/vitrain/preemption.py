"""Stopping on SIGTERM, SIGINT or SIGUSR1: every rank stops at the same batch, `last.ckpt` is
saved once, and every rank exits non-zero.

Why not Lightning's own SIGTERM handling. Lightning's handler broadcasts a tensor from rank 0
inside the signal handler (`_SignalConnector._sigterm_notifier_fn`), that is a collective at
whatever point the main thread was interrupted, and the training loop broadcasts rank 0's flag
once per batch (`_broadcast_sigterm_tensor`). A SIGTERM to a rank other than rank 0, or to all
ranks at slightly different moments, pairs those collectives with the wrong partners: rank 1 waits
in the per-batch broadcast while rank 0 waits in the checkpoint's barrier, for ever (vitrain issue
16: 3 of 3 runs with SIGTERM to rank 1 alone, 2 of 3 with SIGTERM to both). Here a handler only
records the signal, and the ranks agree at one fixed point of every training batch: one
all-reduce of the recorded signal number, on every rank at the same batch (a host sync per step
that Lightning's own per-batch broadcast already makes under DDP). All ranks then save together
and stop together.
"""

import signal
import threading
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment

from vitrain.lightning_internals import cluster_environment, keep_signal_handlers

LAST = "last.ckpt"
# The exit code for each signal: 128 + the signal number, as a shell reports a process it killed;
# SIGUSR1 is SLURM's "you will be terminated" warning, so it ends like SIGTERM.
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGUSR1: 143, signal.SIGINT: 130}


class StopSignals:
    """Process-wide record of the first stop signal; a signal handler is process-wide too.

    A handler records, and does nothing else: whatever the main thread was doing goes on until
    the next agreement point (StopOnSignal). Repeated signals (a burst from a supervisor) are
    ignored; a second SIGINT, a user pressing Ctrl-C again, stops at once (KeyboardInterrupt).
    The handlers stay until `restore`, which train() calls after the run report is written, so
    that no signal of a burst can end the process before it. A process that exits after a stop
    (train.py) sets `ignore_after_stop`: then restore leaves SIGTERM and SIGUSR1 ignored, and a
    burst cannot kill it during its teardown either (exit code 143, not a death by signal).
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.ignore_after_stop = False
        self._previous: dict[int, object] = {}

    def install(self, signums: tuple[int, ...]) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal works in the main thread only; Lightning's loops run there
        for signum in signums:
            if signum not in self._previous:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._record)

    def _record(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum

    def restore(self) -> None:
        ignore = self.ignore_after_stop and self.received is not None
        for signum, handler in self._previous.items():
            keep_ignoring = ignore and signum != signal.SIGINT  # Ctrl-C may still end it
            signal.signal(signum, signal.SIG_IGN if keep_ignoring else handler)
        self._previous = {}
        self.received = None


STOP_SIGNALS = StopSignals()


class Stopped(Exception):
    """Raised on every rank at the same batch once a rank has received a stop signal."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(signal.Signals(self.signum), 128 + self.signum)


class StopOnSignal(pl.Callback):
    """SIGTERM (docker stop, a spot reclaim), SIGINT (Ctrl-C) or SIGUSR1 (SLURM's warning) to
    any rank, or to all: every rank stops at the end of the same training batch, saves
    `<save_dir>/last.ckpt` (when save_dir is set) and raises Stopped.

    Checked at the end of every training batch, and of every sanity-check batch (nothing is
    saved then: nothing has trained). A signal during validation or the epoch-end checkpoint is
    acted on at the next training batch. Under SLURM with Lightning's auto-requeue, SIGUSR1 stays
    Lightning's (it saves and requeues).
    """

    def __init__(self, save_dir: str | None = None) -> None:
        self.save_dir = Path(save_dir) if save_dir else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        environment = cluster_environment(trainer)
        slurm_requeue = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        signums = (signal.SIGTERM, signal.SIGINT)
        if not slurm_requeue and hasattr(signal, "SIGUSR1"):
            signums += (signal.SIGUSR1,)
        STOP_SIGNALS.install(signums)
        keep_signal_handlers(trainer, signums)

    def _agreed_signal(self, trainer: pl.Trainer) -> int:
        """The largest signal number any rank received (0: none); every rank calls this at the
        same batch, so the all-reduce pairs up."""
        local = STOP_SIGNALS.received or 0
        if trainer.world_size == 1:
            return local  # no collective, no device sync
        flag = torch.tensor(float(local), device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(flag, reduce_op="max").item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self._agreed_signal(trainer)
        if signum:
            checkpoint = None
            if self.save_dir is not None:
                checkpoint = self.save_dir / LAST
                trainer.save_checkpoint(checkpoint)  # every rank: it has collectives inside
            raise Stopped(signum, checkpoint)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, *args) -> None:
        if trainer.sanity_checking:
            signum = self._agreed_signal(trainer)
            if signum:
                raise Stopped(signum, None)
