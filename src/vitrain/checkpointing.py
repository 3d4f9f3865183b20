"""Checkpoints that survive kills: atomic writes, a save on preemption, and resume lookup."""

import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vitrain.lightning_internals import cluster_environment

LAST = "last.ckpt"


def stop_like_sigterm(signum, frame) -> None:
    """SIGUSR1 handler: raise SIGTERM in this process, so that Lightning's own SIGTERM handler
    stops the run at the next batch (and, under DDP, tells the other ranks)."""
    signal.raise_signal(signal.SIGTERM)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write beside the target, fsync, then rename over it.

    Lightning's own save goes through fsspec, whose local "transaction" writes to a temporary
    file that may sit on another file system; a kill during the final copy leaves a truncated
    checkpoint in place of the good one. os.replace within one directory cannot.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class PreemptionCheckpoint(OnExceptionCheckpoint):
    """Save `last.ckpt` when the run is stopped: SIGTERM, SIGINT (Ctrl-C) or SIGUSR1.

    Lightning turns SIGTERM into an exception at the next batch and SIGINT into
    KeyboardInterrupt; SIGUSR1 (SLURM's warning signal) is made to act like SIGTERM unless
    Lightning's SLURM auto-requeue owns it (then Lightning saves and requeues). Other exceptions
    (a bug, a non-finite loss) save nothing, so last.ckpt stays the last good state.
    """

    def __init__(self, dirpath: str) -> None:
        super().__init__(dirpath=dirpath, filename=LAST.removesuffix(".ckpt"))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        environment = cluster_environment(trainer)
        slurm_requeue = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        if not slurm_requeue and hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, stop_like_sigterm)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception) -> None:
        if isinstance(exception, SIGTERMException | KeyboardInterrupt):
            super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Keep the file: Lightning's OnExceptionCheckpoint deletes it here, it is last.ckpt."""


def resume_checkpoint(output_dir: str | Path) -> Path | None:
    """The run directory's last checkpoint, which resume=auto continues from."""
    path = Path(output_dir) / "checkpoints" / LAST
    return path if path.is_file() else None
