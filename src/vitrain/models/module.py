"""The LightningModule: a timm ViT trained with the DeiT recipe."""

from typing import Any

import lightning.pytorch as pl
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from vitrain import lightning_internals
from vitrain.data.batch import Batch
from vitrain.errors import UserError
from vitrain.faults import skips_nonfinite_loss
from vitrain.models.factory import create_vit
from vitrain.models.recipe import FUSED_OPTIMIZERS, learning_rate, recipe_mixes, training_loss
from vitrain.runtime import COMPILE_MODES, training_device

# torch.compile wraps a module as `_orig_mod`; checkpoints written by a wrapped model carry it.
_COMPILE_PREFIX = "_orig_mod."


class ViTClassifier(pl.LightningModule):
    """Image classification with a timm ViT.

    Metrics accumulate on the device (torchmetrics) so that the training step never waits for
    the host; the loss is read on the host only when Lightning logs it.

    model: create_vit's arguments (conf/model); recipe: conf/recipe; global_batch_size: the
    configured data.batch_size (the learning rate follows the datamodule's batch when there is
    one: Lightning's batch-size finder may have changed it); compile: a torch.compile mode or
    None (vitrain.runtime.compile_mode decides it); on_nonfinite_loss: faults.on_nonfinite_loss.
    initialized_from: where model.init_from's weights came from, a record: the saved
    hyper-parameters keep it here, with model.init_from cleared, so that a module loaded from
    its own checkpoint (load_from_checkpoint) takes the checkpoint's weights and does not read
    that file again (which may be gone).
    """

    def __init__(
        self,
        model: dict,
        recipe: dict,
        global_batch_size: int,
        compile: str | None = None,
        on_nonfinite_loss: str = "stop",
        initialized_from: str | None = None,
    ) -> None:
        super().__init__()
        if compile is not None and compile not in COMPILE_MODES:
            raise ValueError(f"compile={compile!r}: a torch.compile mode or None")
        self.save_hyperparameters(ignore=["model", "initialized_from"])
        self.save_hyperparameters(
            {
                "model": {**model, "init_from": None},
                "initialized_from": model.get("init_from") or initialized_from,
            }
        )
        self.recipe = recipe
        self.model = create_vit(**model)
        num_classes = model["num_classes"]
        # faults.on_nonfinite_loss=skip: NonFiniteLossGuard reads this, the step acts on it.
        self.skips_nonfinite_loss = skips_nonfinite_loss(on_nonfinite_loss)

        self.mixes = recipe_mixes(recipe)  # the batch-size finder and preflight read it
        self.mixup, self.train_criterion = training_loss(recipe, num_classes)
        self.val_criterion = nn.CrossEntropyLoss()
        # No NaN check: torchmetrics' check reads the loss on the host (`nans.any()`), a sync
        # every step. ("disable" also drops the weights: fine, training batches are all equal.)
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.val_loss = MeanMetric()
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        self.register_buffer(
            "nonfinite_losses", torch.zeros((), dtype=torch.long), persistent=False
        )
        if compile:
            # Module.compile keeps parameter names (no `_orig_mod.`): checkpoints load either way.
            # dynamic=False: one static graph per input shape (each training size, the eval
            # size, a last partial batch) rather than a shape-generic one after the second.
            self.model.compile(mode=compile, dynamic=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        images, targets = batch.images, batch.targets
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        loss = self.train_criterion(self(images), targets)
        # Counted on the device; NonFiniteLossGuard reads it every few steps, not every step.
        self.nonfinite_losses += ~torch.isfinite(loss.detach())
        if self.skips_nonfinite_loss and not self.trainer.strategy.reduce_boolean_decision(
            bool(torch.isfinite(loss)), all=True
        ):
            return None  # faults.on_nonfinite_loss=skip: one host sync per step, on every rank
        # Rank 0's step loss, handed to Lightning only at the steps it writes (log_every_n_steps):
        # each self.log() costs Python time a small model's step notices (docs/performance.md,
        # "Lightning's overhead"). The epoch mean is accumulated on the device, logged and
        # reduced across ranks once per epoch.
        if lightning_internals.logs_this_step(self.trainer):
            self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=images.shape[0])
        self.train_loss.update(loss.detach())  # a host int as weight would be a host-to-device copy
        return loss

    def on_train_epoch_start(self) -> None:
        # A batch that changes by epoch: this epoch's first step already takes its learning rate
        # (Lightning steps the schedule after each update, within the previous epoch).
        if self._epoch_batches() is not None:
            self.lr_scheduler_step(self.lr_schedulers(), None)

    def on_train_epoch_end(self) -> None:
        self.log("train/loss_epoch", self.train_loss)  # compute(), reduced across ranks, reset

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        images, targets = batch.images, batch.targets
        logits = self(images)
        self.val_loss.update(self.val_criterion(logits, targets), weight=images.shape[0])
        self.val_acc1.update(logits, targets)
        self.val_acc5.update(logits, targets)
        n = images.shape[0]
        self.log("val/loss", self.val_loss, on_epoch=True, batch_size=n)
        self.log("val/acc1", self.val_acc1, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("val/acc5", self.val_acc5, on_epoch=True, batch_size=n)

    @property
    def global_batch_size(self) -> int:
        """The global batch that trains: the datamodule's (Lightning's batch-size finder sets it
        there), else the configured one."""
        trainer = lightning_internals.attached_trainer(self)
        datamodule = trainer.datamodule if trainer else None
        return getattr(datamodule, "batch_size", None) or self.hparams.global_batch_size

    @property
    def learning_rate(self) -> float:
        """The recipe's learning rate for the images per optimizer update (models/recipe.py)."""
        trainer = lightning_internals.attached_trainer(self)
        accumulate = trainer.accumulate_grad_batches if trainer else 1
        return learning_rate(self.recipe, self.global_batch_size * accumulate)

    def configure_optimizers(self) -> dict:
        recipe = self.recipe
        fused = recipe["fused"]
        if fused is None:  # a fused kernel where torch has one: AdamW on CUDA
            cuda = training_device(lightning_internals.attached_trainer(self)).type == "cuda"
            fused = cuda and recipe["optimizer"] in FUSED_OPTIMIZERS
        elif fused and recipe["optimizer"] not in FUSED_OPTIMIZERS:
            raise UserError(
                f"recipe.fused=true, but recipe.optimizer={recipe['optimizer']} has no fused "
                f"kernel ({', '.join(FUSED_OPTIMIZERS)} have): set recipe.fused=null."
            )
        # timm leaves out of weight decay: 1-d parameters (norms, biases) and no_weight_decay()
        # (position embedding, class token), with or without layer decay. recipe.layer_decay:
        # timm's param_groups_layer_decay, one group per layer of the model's group_matcher with
        # an `lr_scale` that timm's scheduler multiplies the learning rate by.
        optimizer = create_optimizer_v2(
            self.model,
            opt=recipe["optimizer"],
            lr=self.learning_rate,
            weight_decay=recipe["weight_decay"],
            layer_decay=recipe["layer_decay"],
            betas=tuple(recipe["betas"]),
            eps=recipe["eps"],
            **({"fused": True} if fused else {}),
        )
        total_updates = self.trainer.estimated_stepping_batches * self._batches_vs_epoch_0()
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
        factor = self._batch_lr_factor()
        if factor != 1.0:  # step_update set each group's lr afresh: scaling it never compounds
            for group in scheduler.optimizer.param_groups:
                group["lr"] *= factor

    def _epoch_batches(self) -> tuple[list[int], int] | None:
        """(global training batch of every epoch, the schedule's reference batch) when the
        datamodule's batch changes by epoch (data.batch_size_schedule=scale_tokens), else None."""
        trainer = lightning_internals.attached_trainer(self)
        datamodule = trainer.datamodule if trainer else None
        batch_of = getattr(datamodule, "global_train_batch", None)
        if batch_of is None or datamodule.resolution.batch_size_schedule == "constant":
            return None
        epochs = max(trainer.max_epochs or 1, 1)
        return [batch_of(epoch) for epoch in range(epochs)], datamodule.batch_size

    def _batch_lr_factor(self) -> float:
        """The learning rate follows a batch that changes by epoch (the schedule was built for
        data.batch_size); with lr_scaling=none it does not."""
        batches = self._epoch_batches()
        if batches is None or self.recipe.get("lr_scaling", "linear") != "linear":
            return 1.0
        per_epoch, reference = batches
        return per_epoch[min(self.trainer.current_epoch, len(per_epoch) - 1)] / reference

    def _batches_vs_epoch_0(self) -> float:
        """Lightning counts the schedule's updates with epoch 0's batch; a batch that changes by
        epoch changes the count of updates (in proportion to 1 / batch, to the nearest batch)."""
        batches = self._epoch_batches()
        if batches is None:
            return 1.0
        per_epoch, _ = batches
        return sum(per_epoch[0] / batch for batch in per_epoch) / len(per_epoch)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Accept checkpoints written by a model wrapped with torch.compile(model).
        state = checkpoint["state_dict"]
        for key in [k for k in state if _COMPILE_PREFIX in k]:
            state[key.replace(_COMPILE_PREFIX, "")] = state.pop(key)
