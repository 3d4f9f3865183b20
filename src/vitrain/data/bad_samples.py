"""The one rule for unreadable samples, for every source that decodes in DataLoader workers, and
the callback that counts and names them."""

from collections.abc import Callable, Iterable
from typing import TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image

from vitrain.data.batch import Batch
from vitrain.errors import UserError

ON_BAD_SAMPLE = ("skip", "error")
# What PIL, simplejpeg and the OS raise for truncated, empty, non-image or unreadable files.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# Consecutive unreadable samples tolerated before the source is declared broken: a few bad files
# are normal in a large folder, a run of them means the source is not what it is said to be.
MAX_CONSECUTIVE_BAD = 16
CHECK_HINT = "`python -m vitrain.data.check DATA_ROOT` lists them all"

T = TypeVar("T")


class BadSampleError(UserError):
    pass


class BadSamplePolicy:
    """data.on_bad_sample for one source: skip (the next good sample takes the bad one's place,
    and its name travels with the batch) or error (the first bad file stops the run).

    `repair` says how to fix this source's bad file (e.g. "remove or replace it").
    """

    def __init__(self, on_bad_sample: str, repair: str) -> None:
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise UserError(
                f"data.on_bad_sample={on_bad_sample} is not one of {', '.join(ON_BAD_SAMPLE)}."
            )
        self.skip = on_bad_sample == "skip"
        self.repair = repair

    def first_good(
        self, candidates: Iterable[tuple[str, Callable[[], T]]]
    ) -> tuple[T | None, list]:
        """The first candidate (name, decode) that decodes, and the names of the bad ones before
        it; (None, names) when the candidates run out first."""
        bad: list[str] = []
        for name, decode in candidates:
            try:
                return decode(), bad
            except IMAGE_ERRORS as err:
                if not self.skip:
                    raise BadSampleError(
                        f"cannot read {name}: {err}. {self.repair} ({CHECK_HINT}), or set "
                        "data.on_bad_sample=skip."
                    ) from None
                bad.append(name)
                if len(bad) >= MAX_CONSECUTIVE_BAD:
                    raise BadSampleError(
                        f"{len(bad)} consecutive unreadable samples from {bad[0]}: is this an "
                        f"image dataset? {CHECK_HINT}."
                    ) from None
        return None, bad


class BadSampleMonitor(pl.Callback):
    """Logs `data/bad_samples` (distinct unreadable files met this epoch, summed over ranks) and
    warns with their names."""

    def __init__(self, names_shown: int = 10) -> None:
        self.names_shown = names_shown
        self.bad_files: set[str] = set()  # every epoch's, for the warning
        self._epoch_files: set[str] = set()

    def _collect(self, batch: Batch) -> None:
        self._epoch_files.update(batch.bad_files)  # host strings: no device access

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Batch, batch_idx) -> None:
        self._collect(batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch: Batch, *args) -> None:
        self._collect(batch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        local = torch.tensor(float(len(self._epoch_files)), device=trainer.strategy.root_device)
        # The epoch's one collective of this callback; every rank calls it.
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
                f"sample this epoch: e.g. {', '.join(shown)}. {CHECK_HINT}; "
                "data.on_bad_sample=error makes them fatal."
            )
