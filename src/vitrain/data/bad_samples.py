"""Counts and reports the files RobustImageFolder replaced, once per epoch."""

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn


class BadSampleMonitor(pl.Callback):
    """Logs `data/bad_samples` (distinct unreadable files met this epoch, summed over ranks) and
    warns with their names."""

    def __init__(self, names_shown: int = 10) -> None:
        self.names_shown = names_shown
        self.bad_files: set[str] = set()  # every epoch's, for the warning
        self._epoch_files: set[str] = set()

    def _collect(self, batch) -> None:
        if isinstance(batch, list | tuple) and len(batch) == 3:
            for joined in batch[2]:
                if joined:  # a host-side string: no device access
                    self._epoch_files.update(joined.split(";"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._collect(batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args):
        self._collect(batch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        local = torch.tensor(float(len(self._epoch_files)), device=trainer.strategy.root_device)
        total = int(trainer.strategy.reduce(local, reduce_op="sum").item())
        self.bad_files |= self._epoch_files
        self._epoch_files = set()
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"data/bad_samples": total}, step=trainer.global_step)
        if total:
            shown = sorted(self.bad_files)[: self.names_shown]
            rank_zero_warn(
                f"data/bad_samples={total}: unreadable files were replaced by the next good "
                f"sample this epoch: e.g. {', '.join(shown)}. List them all with `python -m "
                "vitrain.data.check DATA_ROOT`; data.on_bad_sample=error makes them fatal."
            )
