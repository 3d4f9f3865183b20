"""Stop a run whose loss went NaN/inf before it saves a broken checkpoint; no per-step sync."""

import lightning.pytorch as pl

from vitrain.errors import UserError

POLICIES = ("stop", "skip")


class NonFiniteLossError(UserError):
    pass


def skips_nonfinite_loss(policy: str) -> bool:
    """faults.on_nonfinite_loss: stop the run (False) or skip such steps (True)."""
    if policy not in POLICIES:
        raise UserError(f"faults.on_nonfinite_loss={policy} is not one of stop, skip.")
    return policy == "skip"


class NonFiniteLossGuard(pl.Callback):
    """Reads the module's device-side count of non-finite losses every `check_every_n_steps`
    (Lightning reads the loss on the host at its logging steps anyway) and before every
    checkpoint, so a NaN model is never saved over the last good one.

    With faults.on_nonfinite_loss=skip the module skips such steps itself (it needs the loss on
    the host every step: one sync per step, and an all-reduce under DDP so that all ranks skip
    together); the guard then only logs how many it skipped. It reads the module's policy
    (`skips_nonfinite_loss`, from the module's constructor), and sets nothing on it.
    """

    def __init__(self, check_every_n_steps: int = 50) -> None:
        self.check_every_n_steps = max(int(check_every_n_steps), 1)
        self._checked_step = 0

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counter = getattr(pl_module, "nonfinite_losses", None)
        if counter is None or getattr(pl_module, "skips_nonfinite_loss", False):
            return
        found = trainer.strategy.reduce_boolean_decision(bool(counter), all=False)
        if found:
            last = getattr(trainer.checkpoint_callback, "dirpath", None)
            raise NonFiniteLossError(
                "train/loss became NaN or inf between global steps "
                f"{self._checked_step} and {trainer.global_step}; training stopped and the last "
                f"good checkpoint is kept in {last or 'no checkpoint directory'} (last.ckpt). "
                "Try a lower recipe.base_lr, trainer.gradient_clip_val=1.0, "
                "trainer.precision=bf16-mixed instead of 16-mixed, or "
                "faults.on_nonfinite_loss=skip."
            )
        self._checked_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.check_every_n_steps == 0:
            self._check(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if getattr(pl_module, "skips_nonfinite_loss", False) and trainer.is_global_zero:
            skipped = int(pl_module.nonfinite_losses)
            for logger in trainer.loggers:
                logger.log_metrics({"train/nonfinite_steps": skipped}, step=trainer.global_step)
