"""The LightningModule: a timm ViT trained with the DeiT recipe."""

from typing import Any

import lightning.pytorch as pl
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from vitrain.errors import UserError
from vitrain.models.factory import create_vit

# torch.compile wraps a module as `_orig_mod`; checkpoints written by a wrapped model carry it.
_COMPILE_PREFIX = "_orig_mod."
# torch.compile's modes; `compile=true` means "default", `false` / "off" no compilation.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(value: bool | str | None, accelerator: str | None = None) -> str | None:
    """The torch.compile mode the `compile` config value asks for; None: run eagerly.

    `auto` compiles ("default") where the run trains on a CUDA GPU (trainer.accelerator) and runs
    eagerly elsewhere: on an H200 compile made ViT-S/B/L 65/33/28 % faster, while on a CPU
    (vit_micro) it saved 3-15 % of a step for 22 s of compiling, paid back only after thousands
    of steps (docs/performance.md, "What compile costs").
    """
    if str(value).lower() == "auto":
        cuda = accelerator in ("gpu", "cuda") or (
            accelerator in (None, "auto") and torch.cuda.is_available()
        )
        return "default" if cuda else None
    if value is None or value is False or str(value).lower() in ("false", "off", "none"):
        return None
    if value is True or str(value).lower() in ("true", "on"):
        return "default"
    if value not in COMPILE_MODES:
        raise UserError(
            f"compile={value} is not one of auto, off, {', '.join(COMPILE_MODES)} "
            "(torch.compile's modes; true means default)."
        )
    return str(value)


class ViTClassifier(pl.LightningModule):
    """Image classification with a timm ViT.

    Metrics accumulate on the device (torchmetrics) so that the training step never waits for
    the host; the loss is read on the host only when Lightning logs it.
    """

    def __init__(
        self,
        model: dict,
        recipe: dict,
        global_batch_size: int,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_cfg = dict(model)
        self.recipe = recipe
        self.model = create_vit(**self.model_cfg)
        num_classes = self.model_cfg["num_classes"]

        mixing = recipe["mixup_alpha"] > 0 or recipe["cutmix_alpha"] > 0
        self.mixup = (
            Mixup(
                mixup_alpha=recipe["mixup_alpha"],
                cutmix_alpha=recipe["cutmix_alpha"],
                prob=recipe["mixup_prob"],
                switch_prob=recipe["mixup_switch_prob"],
                label_smoothing=recipe["label_smoothing"],
                num_classes=num_classes,
            )
            if mixing
            else None
        )
        # With mixup the targets are soft (smoothing included); without, smoothing is the loss's.
        self.train_criterion = (
            SoftTargetCrossEntropy()
            if mixing
            else nn.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"])
        )
        self.val_criterion = nn.CrossEntropyLoss()
        # No NaN check: torchmetrics' check reads the loss on the host (`nans.any()`), a sync
        # every step. ("disable" also drops the weights: fine, training batches are all equal.)
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.val_loss = MeanMetric()
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.register_buffer(
            "nonfinite_losses", torch.zeros((), dtype=torch.long), persistent=False
        )
        self.skip_nonfinite_loss = False  # set by NonFiniteLossGuard
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        mode = compile_mode(compile)
        if mode:
            # Module.compile keeps parameter names (no `_orig_mod.`): checkpoints load either way.
            self.model.compile(mode=mode)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        images, targets = batch[0], batch[1]  # ImageFolder batches also carry bad-file names
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        loss = self.train_criterion(self(images), targets)
        # Counted on the device; NonFiniteLossGuard reads it every few steps, not every step.
        self.nonfinite_losses += ~torch.isfinite(loss.detach())
        if self.skip_nonfinite_loss and not self.trainer.strategy.reduce_boolean_decision(
            bool(torch.isfinite(loss)), all=True
        ):
            return None  # faults.on_nonfinite_loss=skip: one host sync per step, on every rank
        # Rank 0's step loss, handed to Lightning only at the steps it writes (log_every_n_steps):
        # each self.log() costs 0.1-1 ms of Python, a few % of a small model's step. The epoch
        # mean is accumulated on the device, logged and reduced across ranks once per epoch.
        if self._logs_this_step():
            self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=images.shape[0])
        self.train_loss.update(loss.detach())  # a host int as weight would be a host-to-device copy
        return loss

    def _logs_this_step(self) -> bool:
        """Whether Lightning writes step metrics after this batch (its own test; True if absent)."""
        connector = getattr(self.trainer, "_logger_connector", None)
        should = getattr(connector, "should_update_logs", True)
        return bool(should or self.trainer.fast_dev_run)

    def on_train_epoch_end(self) -> None:
        self.log("train/loss_epoch", self.train_loss)  # compute(), reduced across ranks, reset

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, targets = batch[0], batch[1]
        logits = self(images)
        self.val_loss.update(self.val_criterion(logits, targets), weight=images.shape[0])
        self.val_acc1.update(logits, targets)
        self.val_acc5.update(logits, targets)
        n = images.shape[0]
        self.log("val/loss", self.val_loss, on_epoch=True, batch_size=n)
        self.log("val/acc1", self.val_acc1, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("val/acc5", self.val_acc5, on_epoch=True, batch_size=n)

    @property
    def learning_rate(self) -> float:
        """base_lr scaled by the images per optimizer update over 512 (the DeiT rule)."""
        accumulate = self.trainer.accumulate_grad_batches if self._trainer else 1
        images_per_update = self.hparams.global_batch_size * accumulate
        return self.recipe["base_lr"] * images_per_update / 512

    def configure_optimizers(self) -> dict:
        recipe = self.recipe
        fused = recipe["fused"]
        if fused is None:
            fused = self.device.type == "cuda"
        # timm leaves out of weight decay: 1-d parameters (norms, biases) and no_weight_decay()
        # (position embedding, class token).
        optimizer = create_optimizer_v2(
            self.model,
            opt=recipe["optimizer"],
            lr=self.learning_rate,
            weight_decay=recipe["weight_decay"],
            betas=tuple(recipe["betas"]),
            eps=recipe["eps"],
            **({"fused": True} if fused else {}),
        )
        total_updates = self.trainer.estimated_stepping_batches
        if total_updates == float("inf"):
            raise UserError(
                "trainer.max_epochs and trainer.max_steps are both unbounded: the cosine schedule "
                "needs a length. Set trainer.max_epochs=N or trainer.max_steps=N."
            )
        epochs = max(self.trainer.max_epochs or 1, 1)
        warmup = round(recipe["warmup_epochs"] * total_updates / epochs)
        warmup = min(warmup, max(int(total_updates) - 1, 0))
        scheduler = CosineLRScheduler(
            optimizer,
            t_initial=max(int(total_updates) - warmup, 1),
            lr_min=recipe["min_lr"],
            warmup_t=warmup,
            warmup_lr_init=recipe["warmup_lr"],
            warmup_prefix=True,
            t_in_epochs=False,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def lr_scheduler_step(self, scheduler: CosineLRScheduler, metric: Any) -> None:
        # timm schedulers are not torch LRSchedulers: they take the update count.
        scheduler.step_update(num_updates=self.global_step)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Accept checkpoints written by a model wrapped with torch.compile(model).
        state = checkpoint["state_dict"]
        for key in [k for k in state if _COMPILE_PREFIX in k]:
            state[key.replace(_COMPILE_PREFIX, "")] = state.pop(key)
