"""Random batches made once on the training device: measures compute, not the input pipeline."""

import lightning.pytorch as pl
import torch

from vitrain.data.batch import Batch
from vitrain.data.sizing import per_device_batch_size
from vitrain.runtime import training_device


class DeviceBatches:
    """`length` batches that are the same tensors on the device: no copy, no decode, no wait.

    The tensors are made at the first iteration, not with the loader: Lightning's batch-size
    finder builds the next loader while the failed trial's out-of-memory exception (and so its
    activations) is still alive, and a loader that allocated then would run out of memory itself.
    """

    def __init__(
        self, shape: tuple[int, ...], num_classes: int, device: torch.device, length: int
    ) -> None:
        self.shape, self.num_classes, self.device, self.length = shape, num_classes, device, length
        self.batch: Batch | None = None

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        if self.batch is None:
            images = torch.randn(self.shape, device=self.device)
            targets = torch.randint(0, self.num_classes, self.shape[:1], device=self.device)
            self.batch = Batch(images, targets)
        for _ in range(self.length):
            yield self.batch


class SyntheticDataModule(pl.LightningDataModule):
    """data=synthetic: `train_batches` and `val_batches` random batches a epoch, on the device.

    augment, repeated_aug, eval_crop_pct: the input pipeline's settings, which a recipe or an
    experiment sets with the rest of it (recipe=deit3, experiment=finetune): synthetic batches
    have no input pipeline, so they take them and change nothing (the recipe's loss, optimiser
    and mixing still apply: they are the model's).
    """

    def __init__(
        self,
        batch_size: int,
        image_size: int,
        num_classes: int,
        train_batches: int = 100,
        val_batches: int = 10,
        augment: dict | None = None,
        repeated_aug: int = 1,
        eval_crop_pct: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size  # global; Lightning's batch-size finder may change it
        self.image_size = image_size
        self.num_classes = num_classes
        self.train_batches = train_batches
        self.val_batches = val_batches

    def check(self, stage: str = "fit") -> None:
        """Nothing to find on disk, and no class names to record."""

    @property
    def per_device_batch_size(self) -> int:
        world_size = self.trainer.world_size if self.trainer else 1
        return per_device_batch_size(self.batch_size, world_size)

    def _batches(self, length: int) -> DeviceBatches:
        device = training_device(self.trainer)
        shape = (self.per_device_batch_size, 3, self.image_size, self.image_size)
        return DeviceBatches(shape, self.num_classes, device, length)

    def train_dataloader(self) -> DeviceBatches:
        return self._batches(self.train_batches)

    def val_dataloader(self) -> DeviceBatches:
        return self._batches(self.val_batches)
