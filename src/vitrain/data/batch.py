"""The one shape of a batch, whichever source made it."""

from collections.abc import Sequence
from typing import NamedTuple

import torch


class Batch(NamedTuple):
    """What every data source yields and the module trains on.

    images: (N, 3, H, W); uint8 from the fast path until the datamodule's on_after_batch_transfer
        normalises them on the device, float32 after that and from every other source.
    targets: (N,) int64 class indices.
    bad_files: the unreadable files replaced by good samples in this batch (host strings; empty
        nearly always): DataLoader workers are other processes, so the names travel with the batch
        to the main process, where BadSampleMonitor counts and names them.

    A NamedTuple because torch's pin_memory and Lightning's device transfer rebuild NamedTuples
    field by field: the strings stay on the host, the tensors move.
    """

    images: torch.Tensor
    targets: torch.Tensor
    bad_files: tuple[str, ...] = ()


# One sample as a dataset returns it: (image, class index, files it replaced).
Sample = tuple[torch.Tensor, int, tuple[str, ...]]


def collate_samples(samples: Sequence[Sample]) -> Batch:
    """The DataLoader's collate_fn for every source that decodes samples in workers."""
    images, targets, replaced = zip(*samples, strict=True)
    return Batch(
        torch.stack(images),
        torch.tensor(targets, dtype=torch.int64),
        tuple(name for names in replaced for name in names),
    )
