"""tune.batch_size=true: the largest per-device batch that fits, found before training starts."""

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BatchSizeFinder
from lightning.pytorch.utilities import rank_zero_warn

from vitrain.errors import UserError


class PerDeviceBatchSizeFinder(BatchSizeFinder):
    """Lightning's BatchSizeFinder on the datamodule's `batch_size`, and a recipe that follows it.

    Lightning's finder runs a few training steps per trial, doubling the batch until the device
    runs out of memory (`power`; `binsearch` then bisects), restores the weights afterwards and
    sets the datamodule's `batch_size` to the batch found. It runs on one device only (Lightning
    refuses distributed strategies), where the global batch `data.batch_size` is the per-device
    batch. After the search:

    - the optimizer and schedule are rebuilt (the optimizer has no state yet), so that the
      learning rate (base_lr x batch / 512, from the datamodule's batch) and the schedule's
      length follow the batch found;
    - `optimal_batch_size` holds the answer, which the run report records;
    - one line says the per-device batch and the `data.batch_size` to use on N devices.

    The trials run eagerly, even when `runtime.compile` is on: compiling every trial's batch
    size would cost a compilation per trial, and after two sizes dynamo would make the batch
    dimension dynamic, so that training ran a shape-generic graph. Training then compiles once,
    for the batch found (docs/performance.md: eager and compiled steps took the same memory).
    """

    def __init__(
        self,
        mode: str = "power",
        steps_per_trial: int = 3,
        max_trials: int = 25,
        init_val: int = 2,
        max_val: int = 8192,
        ckpt_path: str | None = None,
    ) -> None:
        if mode not in BatchSizeFinder.SUPPORTED_MODES:
            raise UserError(f"tune.mode={mode} is not one of power, binsearch.")
        if ckpt_path:
            raise UserError(
                "tune.batch_size=true with ckpt_path: a resumed run keeps the batch it started "
                "with. Tune on a fresh run (drop ckpt_path), or set data.batch_size yourself."
            )
        super().__init__(
            mode=mode,
            steps_per_trial=steps_per_trial,
            init_val=init_val,
            max_trials=max_trials,
            batch_arg_name="batch_size",
            max_val=max_val,
        )
        self.search_mode = mode

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            raise UserError(
                f"tune.batch_size=true runs on one device, this run has {trainer.world_size}: "
                "find the batch with trainer.devices=1 trainer.num_nodes=1, then train on N "
                "devices with data.batch_size=<found> x N (data.batch_size is the global batch)."
            )
        if self.search_mode == "binsearch" and getattr(pl_module, "mixes", False):
            raise UserError(
                "tune.mode=binsearch tries odd batch sizes, and mixup/cutmix needs an even batch: "
                "use tune.mode=power, or recipe.mixup_alpha=0 recipe.cutmix_alpha=0."
            )
        super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path:
            rank_zero_warn(
                "tune.batch_size=true is ignored when resuming: the run continues with the "
                "batch size it was started with."
            )
            return
        with torch.compiler.set_stance("force_eager"):
            super().on_fit_start(trainer, pl_module)  # the search; Lightning restores the weights
        found = self.optimal_batch_size
        if found is None:  # skipped (fast_dev_run)
            return
        trainer.strategy.setup_optimizers(trainer)  # the learning rate of the batch found
        print(
            f"tune.batch_size: {found} images per device fit; training on with "
            f"data.batch_size={found} (this one device). On N devices use "
            f"data.batch_size={found} x N, e.g. {found * 8} on 8.",
            flush=True,
        )
