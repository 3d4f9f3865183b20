"""Each epoch's samples, and how far an epoch has got: what makes the ImageFolder and shard loaders
resume mid-epoch exactly (every sample of the interrupted epoch seen once).

Lightning's own route, a DataLoader with state_dict/load_state_dict (or torchdata's
StatefulDataLoader), saves the state but never loads it back when configure_optimizers reads
`trainer.estimated_stepping_batches`, as vitrain's per-update LR schedule does (Lightning issue
20550, open: the loader is built before the loops' state is restored, and not again). The
datamodule's own state_dict/load_state_dict is restored before that, so the position travels
there (base.WorkerDecodedDataModule): the loader counts the batches it hands to training
(`position`), and the next iteration of that epoch starts after them (`resume`).

Repeated augmentation (data.repeated_aug, `Repeats`) is part of an epoch's order too: every
sample `count` times in a row, each time augmented anew, so that one position count still says
how far every rank has got.

Where the skipping happens is the source's: an EpochSampler (ImageFolder) leaves out the
positions of the epoch's order already read; a ShardDataset (tar shards) reads, without
decoding, the samples each worker had already handed over. Both take `start(epoch, batches,
batch_size)` before each epoch's iteration.
"""

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch.utils.data import DataLoader, DistributedSampler

from vitrain.errors import UserError

log = logging.getLogger(__name__)


EPOCH_LENGTHS = ("dataset", "repeated")


@dataclass(frozen=True)
class Repeats:
    """Repeated augmentation (Hoffer et al. 2020; DeiT's RASampler, timm's RepeatAugSampler):
    each sample `count` times in a row in the epoch's order, each time with its own random
    augmentation. `epoch_length`: `dataset` keeps an epoch as long as one without repeats (DeiT's
    and timm's: an epoch then holds about 1/count of the images, each count times); `repeated`
    makes it count times longer, every image count times.
    """

    count: int = 1
    epoch_length: str = "dataset"

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise UserError(
                f"data.repeated_aug={self.count} must be a whole number of times each image "
                "appears in a row: 1 (off, the default) or e.g. 3 (DeiT's)."
            )
        if self.epoch_length not in EPOCH_LENGTHS:
            raise UserError(
                f"data.repeated_aug_epoch={self.epoch_length} is not one of dataset (an epoch as "
                "long as without repeats, DeiT's) or repeated (every image repeated_aug times)."
            )

    def positions(self, num_samples: int) -> int:
        """The length of an epoch's order, all ranks together, before padding to the world."""
        return num_samples * self.count if self.epoch_length == "repeated" else num_samples


NO_REPEATS = Repeats()


class EpochPosition(NamedTuple):
    """How far one rank's epoch has got, and the settings that fix the order of its samples."""

    epoch: int
    batches: int  # handed to training in this epoch, by each rank
    world_size: int
    batch_size: int  # per device
    num_workers: int


class EpochSource(Protocol):
    # The settings an exact resume needs unchanged (EpochPosition field names).
    RESUME_SETTINGS: tuple[str, ...]

    def start(self, epoch: int, batches: int, batch_size: int) -> None:
        """Prepare `epoch`'s iteration, leaving out each rank's first `batches` batches."""


class EpochSampler(DistributedSampler):
    """The order of each epoch's samples on each rank, resumable at any batch.

    `epoch_order(epoch)` is the sequence of dataset indices of the epoch for all ranks together:
    a permutation seeded by seed + epoch (torch's DistributedSampler's, so the order is the one
    Lightning's injected sampler gave), padded with its first indices to a multiple of the world
    size, as DistributedSampler pads. Rank r reads positions r, r + world, r + 2 world, ...
    (DistributedSampler's split), so the first n samples of every rank are the first n x world
    positions of the order: one number says how far the epoch has got on every rank.
    With `repeats` (data.repeated_aug) each index of the permutation stands `repeats.count`
    times in a row, so its repeats go to consecutive ranks, as in DeiT's RASampler; the order
    is then cut to the epoch's length (Repeats.positions). Used on one device too (world size
    1): the order then depends on the seed and the epoch alone.
    """

    RESUME_SETTINGS = ("world_size", "batch_size")

    def __init__(
        self,
        dataset,
        *,
        world_size: int,
        rank: int,
        seed: int,
        shuffle: bool = True,
        repeats: Repeats = NO_REPEATS,
    ):
        super().__init__(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self.repeats = repeats
        self.num_samples = math.ceil(repeats.positions(len(dataset)) / world_size)
        self.total_size = self.num_samples * world_size
        self.skip = 0  # positions of the epoch's order already read, all ranks together

    def epoch_order(self, epoch: int) -> list[int]:
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + epoch)
            permutation = torch.randperm(len(self.dataset), generator=generator)
        else:
            permutation = torch.arange(len(self.dataset))
        order = permutation.repeat_interleave(self.repeats.count).tolist()
        padding = self.total_size - len(order)
        if padding > 0:
            order += (order * math.ceil(padding / len(order)))[:padding]
        return order[: self.total_size]

    def start(self, epoch: int, batches: int, batch_size: int) -> None:
        self.set_epoch(epoch)
        self.skip = batches * batch_size * self.num_replicas

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order(self.epoch)
        return iter(order[self.skip + self.rank : self.total_size : self.num_replicas])


class ResumableLoader(DataLoader):
    """A DataLoader that knows how far its epoch has got: `position()` (the batches it has
    handed to training in the current epoch), and `resume` (returns the position to continue
    from, or None; asked once per iteration, and the giver hands a position out once).
    `source` (an EpochSource: the sampler or the dataset) is told each epoch where to start;
    `epoch_of` says which epoch a new iteration is.

    The iteration starts at the first batch asked for, not at iter(): Lightning creates the
    iterator of a resumed run before it has restored the epoch. And the position is asked for
    then, not when the loader is built: with a resolution schedule the loader may be built
    once more before the resumed epoch starts.
    """

    def __init__(
        self,
        dataset,
        *,
        source: EpochSource,
        epoch_of: Callable[[], int],
        world_size: int,
        resume: Callable[[], EpochPosition | None] = lambda: None,
        **loader_args,
    ) -> None:
        super().__init__(dataset, **loader_args)
        self.source = source
        self.epoch_of = epoch_of
        self.world_size = world_size
        self.resume = resume
        self._position: EpochPosition | None = None

    def position(self) -> EpochPosition | None:
        return self._position

    def __iter__(self) -> Iterator:
        epoch = self.epoch_of()
        batches = self._resumed_batches(epoch)
        self.source.start(epoch, batches, self.batch_size)
        here = EpochPosition(epoch, batches, self.world_size, self.batch_size, self.num_workers)
        self._position = here
        for batch in super().__iter__():
            here = here._replace(batches=here.batches + 1)
            self._position = here
            yield batch

    def _resumed_batches(self, epoch: int) -> int:
        resume = self.resume()
        if resume is None or resume.epoch != epoch or resume.batches == 0:
            return 0
        now = EpochPosition(epoch, 0, self.world_size, self.batch_size, self.num_workers)
        changed = [
            f"{name} {getattr(resume, name)} then, {getattr(now, name)} now"
            for name in self.source.RESUME_SETTINGS
            if getattr(resume, name) != getattr(now, name)
        ]
        if changed:
            log.warning(
                f"epoch {epoch} was stopped after {resume.batches} batches with other settings "
                f"({'; '.join(changed)}): it starts over, so some of its samples are seen twice. "
                "Resume with the same devices, data.batch_size and data.num_workers to continue "
                "it exactly."
            )
            return 0
        return resume.batches
