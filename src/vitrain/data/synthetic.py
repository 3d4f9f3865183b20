"""Random batches made once on the training device: measures compute, not the input pipeline."""

import lightning.pytorch as pl
import torch

from vitrain.data.batching import per_device_batch_size


class DeviceBatches:
    """`length` batches that are the same tensors on the device: no copy, no decode, no wait."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, length: int) -> None:
        self.images, self.targets, self.length = images, targets, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for _ in range(self.length):
            yield self.images, self.targets


class SyntheticDataModule(pl.LightningDataModule):
    def __init__(
        self,
        batch_size: int,
        image_size: int,
        num_classes: int,
        train_batches: int = 100,
        val_batches: int = 10,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.image_size = image_size
        self.num_classes = num_classes
        self.train_batches = train_batches
        self.val_batches = val_batches

    def check(self) -> None:
        """Nothing to find on disk."""

    @property
    def per_device_batch_size(self) -> int:
        world_size = self.trainer.world_size if self.trainer else 1
        return per_device_batch_size(self.batch_size, world_size)

    def _batches(self, length: int) -> DeviceBatches:
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        shape = (self.per_device_batch_size, 3, self.image_size, self.image_size)
        images = torch.randn(shape, device=device)
        targets = torch.randint(0, self.num_classes, (shape[0],), device=device)
        return DeviceBatches(images, targets, length)

    def train_dataloader(self) -> DeviceBatches:
        return self._batches(self.train_batches)

    def val_dataloader(self) -> DeviceBatches:
        return self._batches(self.val_batches)
