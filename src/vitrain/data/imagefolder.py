"""data=imagenet: an ImageFolder of files, root/train/<class>/* and root/val/<class>/*."""

from collections.abc import Callable
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from vitrain.data.bad_samples import BadSampleError, BadSamplePolicy
from vitrain.data.base import WorkerDecodedDataModule
from vitrain.data.batch import Sample
from vitrain.data.epochs import EpochSampler
from vitrain.data.layout import Listing


class ImageFolderDataset(Dataset):
    """A split's files, decoded by `transform` (path -> tensor) under the bad-sample rule: an
    unreadable file is replaced by the next good one, whose sample names it."""

    def __init__(
        self,
        listing: Listing,
        transform: Callable[[str], torch.Tensor],
        bad_samples: BadSamplePolicy,
    ) -> None:
        self.listing = listing
        self.samples = listing.samples
        self.transform = transform
        self.bad_samples = bad_samples

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, path: str, target: int) -> tuple[torch.Tensor, int]:
        return self.transform(path), target

    def __getitem__(self, index: int) -> Sample:
        count = len(self.samples)
        candidates = (
            (path, partial(self._decode, path, target))
            for path, target in (self.samples[(index + k) % count] for k in range(count))
        )
        decoded, bad = self.bad_samples.first_good(candidates)
        if decoded is None:
            raise BadSampleError(
                f"no readable image in {self.listing.split_dir}: e.g. {bad[0]}. Check it with "
                "`python -m vitrain.data.check DATA_ROOT`."
            )
        image, target = decoded
        return image, target, tuple(bad)


class ImageFolderDataModule(WorkerDecodedDataModule):
    def dataset(self, split: str) -> ImageFolderDataset:
        return ImageFolderDataset(
            self.listing(split), self.sample_transform(split), self.bad_samples
        )

    def build_train_loader(self) -> DataLoader:
        dataset = self.split_dataset("train")
        sampler = EpochSampler(
            dataset,
            world_size=self.world_size,
            rank=self.rank,
            seed=self.shuffle_seed,
            repeats=self.repeats,
        )
        batch = self.train_per_device_batch(self.epoch)
        return self.train_loader(dataset, sampler, batch, sampler=sampler)

    def build_val_loader(self, batch_size: int) -> DataLoader:
        dataset = self.split_dataset("val")
        # Lightning's own split across DDP ranks, given here: Lightning would otherwise make a new
        # DataLoader around it, and new workers, each time it asks for the loader.
        sampler = DistributedSampler(
            dataset, num_replicas=self.world_size, rank=self.rank, shuffle=False
        )
        return self.dataloader(dataset, batch_size, sampler=sampler, drop_last=False)
