"""Read the tar shards of `python -m vitrain.data.write_shards` from a local path or an
object-store URL.

Why webdataset tar shards and not litdata. Both stream shards from s3/gs/https; the deciding
requirement is DDP: every rank must get the same number of batches (unequal counts hang DDP at the
epoch's end) and every sample must be read once per epoch. litdata decides the rank and worker
split inside its StreamingDataset, and its tracker shows that split going wrong for exactly this:
uneven batches across ranks (Lightning-AI/litData#233), DDP hangs at the epoch end (#129, #408,
#452), data not split across ranks (#411, #440). webdataset splits whole shards across nodes and
workers (unequal sample counts whenever the shards do not divide evenly) and its maintainers'
answer for DDP is resampling with a nominal epoch (`.with_epoch`, webdataset#250), which repeats
and skips samples. Plain tar shards with an index of per-shard counts let the split be planned
exactly, in a few lines that are tested here (`worker_segments`),
while webdataset still does the tar work (TarWriter, tar member iteration and grouping, the
shuffle buffer); fsspec opens local paths, file://, http(s):// and, with s3fs/gcsfs installed,
s3:// and gs://. Tar shards are also the one format any tool (tar, DALI, HF datasets) reads.

Each epoch: the shard order is shuffled with (seed, epoch), the same on every rank; the samples in
that order are cut into `world` contiguous, equal parts (padded like DistributedSampler when the
count does not divide: the first few samples of the epoch are read twice); each rank's part is cut
at whole batches among its DataLoader workers; each worker streams its shard segments through a
shuffle buffer. Training drops the rank's last partial batch (mixup needs equal batches), as the
ImageFolder loader does; validation keeps it. With repeated augmentation (data.repeated_aug=N)
the epoch's sequence holds every sample N times in a row (and is cut to the dataset's length,
or not: vitrain.data.epochs.Repeats), and the plan is made over its positions: the repeats of a
sample then mostly stay in one worker, whose shuffle buffer spreads them over its batches.
"""

import bisect
import itertools
import json
import multiprocessing
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from urllib.parse import urlparse

import fsspec
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.datasets.folder import IMG_EXTENSIONS
from webdataset.filters import shuffle as shuffle_buffer
from webdataset.tariterators import group_by_keys, tar_file_iterator

from vitrain.data.bad_samples import BadSampleError, BadSamplePolicy
from vitrain.data.base import WorkerDecodedDataModule
from vitrain.data.batch import Sample
from vitrain.data.epochs import NO_REPEATS, Repeats
from vitrain.data.layout import SPLITS
from vitrain.errors import UserError

INDEX_NAME = "index.json"  # beside each split's shards, written by vitrain.data.write_shards
INDEX_FORMAT = "vitrain-webdataset-shards/1"
# Tar member suffixes that hold the image (the converter keeps the source file's suffix).
IMAGE_SUFFIXES = frozenset(ext.lstrip(".") for ext in IMG_EXTENSIONS)


@dataclass(frozen=True)
class Segment:
    """Positions [start, stop) of the shard at `shard` in the index's shard list: its samples,
    or with repeats (read_segment) its samples each `repeats` times in a row."""

    shard: int
    start: int
    stop: int


def join_url(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def open_url(url: str):
    """A binary read stream for a local path or any URL fsspec knows (s3 needs s3fs, gs gcsfs)."""
    scheme = urlparse(url).scheme
    # http(s): a plain streaming GET; fsspec's default random-access file needs Range support.
    options = {"block_size": 0} if scheme in ("http", "https") else {}
    try:
        return fsspec.open(url, "rb", **options).open()
    except (ImportError, ValueError) as err:  # unknown protocol, or its package not installed
        raise UserError(
            f"data.root: cannot open {url} ({err}). Local paths, file://, http(s):// work as they "
            "are; s3:// needs `pip install s3fs`, gs:// `pip install gcsfs`."
        ) from None


def read_index(split_url: str) -> dict:
    url = join_url(split_url, INDEX_NAME)
    try:
        with open_url(url) as handle:
            index = json.load(handle)
    except (FileNotFoundError, OSError) as err:
        raise UserError(
            f"data.root: no shard index at {url} ({type(err).__name__}). Convert the ImageFolder "
            "first: `python -m vitrain.data.write_shards /data/imagenet /data/imagenet-shards`, "
            "then data.root=/data/imagenet-shards (or the s3://... URL you copied it to)."
        ) from None
    if index.get("format") != INDEX_FORMAT:
        raise UserError(
            f"{url} is not a vitrain shard index (format {index.get('format')!r}, expected "
            f"{INDEX_FORMAT!r}): rebuild it with `python -m vitrain.data.write_shards SRC DST`."
        )
    return index


def samples_per_rank(num_samples: int, world_size: int) -> int:
    """Every rank's share, rounded up: the padded total is a multiple of the world size."""
    return -(-num_samples // world_size)


def batches_per_rank(num_samples: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    share = samples_per_rank(num_samples, world_size)
    return share // batch_size if drop_last else -(-share // batch_size)


def batches_taken(worker: int, num_workers: int, batches: int, taken: int) -> int:
    """Of a rank's first `taken` batches, how many came from `worker`. The DataLoader asks its
    workers in turn (in order, torch's default) and skips a worker whose batches have run out;
    each worker has a whole-batch share of the rank's `batches` (worker_segments)."""
    base, extra = divmod(batches, num_workers)
    if taken <= base * num_workers:
        return taken // num_workers + (worker < taken % num_workers)
    return base + (worker < taken - base * num_workers)


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    order = list(range(num_shards))
    if shuffle:
        # A string seed is hashed with sha512: the same order in every process, whatever
        # PYTHONHASHSEED is.
        random.Random(f"shards-{seed}-{epoch}").shuffle(order)
    return order


def worker_segments(
    shard_counts: list[int],
    *,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    batch_size: int,
    drop_last: bool,
    epoch: int = 0,
    seed: int = 0,
    shuffle: bool = False,
    repeats: Repeats = NO_REPEATS,
) -> list[Segment]:
    """The shard segments one DataLoader worker of one rank reads in this epoch."""
    order = shard_order(len(shard_counts), seed, epoch, shuffle)
    counts = [count * repeats.count for count in shard_counts]  # positions per shard
    total = sum(counts)
    length = repeats.positions(sum(shard_counts))  # the epoch's positions, cut or not
    share = samples_per_rank(length, world_size)
    batches = batches_per_rank(length, world_size, batch_size, drop_last)
    used = min(share, batches * batch_size)
    # Whole batches per worker, so that only the rank's last batch can be partial.
    base, extra = divmod(batches, num_workers)
    first_batch = worker * base + min(worker, extra)
    worker_batches = base + (worker < extra)
    begin = rank * share + first_batch * batch_size
    end = rank * share + min(used, (first_batch + worker_batches) * batch_size)
    # Positions in the epoch's sample sequence; those past the total wrap around (the padding).
    starts = [0]
    for shard in order:
        starts.append(starts[-1] + counts[shard])
    segments = []
    while begin < end:
        position = begin % total
        slot = bisect.bisect_right(starts, position) - 1
        offset = position - starts[slot]
        take = min(counts[order[slot]] - offset, end - begin)
        segments.append(Segment(order[slot], offset, offset + take))
        begin += take
    return segments


def read_segment(url: str, segment: Segment, repeats: int = 1) -> Iterator[dict]:
    """The samples of one shard segment, streamed: {"__key__", "<image suffix>", "cls", ...};
    sample n stands at positions n x repeats ... n x repeats + repeats - 1."""
    with open_url(url) as stream:
        members = ({**member, "__url__": url} for member in tar_file_iterator(stream))
        for number, sample in enumerate(group_by_keys(members)):
            first = number * repeats
            if first >= segment.stop:
                return
            times = min(first + repeats, segment.stop) - max(first, segment.start)
            yield from [sample] * max(times, 0)


class ShardDataset(IterableDataset):
    """(image, target, replaced files) samples of one split's shards, split exactly across DDP
    ranks and DataLoader workers (see the module docstring). `configure` sets the rank's place
    and batch before the DataLoader is built; `start` (shared memory, so persistent workers see
    it) the epoch, and the batches of it already read (a resumed epoch), before each epoch's
    iteration (vitrain.data.epochs.ResumableLoader calls it)."""

    def __init__(
        self,
        split_url: str,
        index: dict,
        transform: Callable[[bytes], torch.Tensor],
        bad_samples: BadSamplePolicy,
        *,
        shuffle: bool,
        seed: int = 0,
        buffer_size: int = 1000,
        repeats: Repeats = NO_REPEATS,
    ) -> None:
        self.split_url = split_url
        self.shard_names = [shard["name"] for shard in index["shards"]]
        self.shard_counts = [shard["num_samples"] for shard in index["shards"]]
        self.transform = transform
        self.bad_samples = bad_samples
        self.shuffle, self.seed, self.buffer_size = shuffle, seed, buffer_size
        self.repeats = repeats
        # The epoch's positions, all ranks together: the samples, or their repeats.
        self.positions = repeats.positions(sum(self.shard_counts))
        self.rank, self.world_size, self.batch_size, self.drop_last = 0, 1, 1, False
        # Shared memory: persistent workers keep the dataset object they started with (open_clip
        # shares its webdataset epoch the same way). _skip: the rank's batches of this epoch
        # already handed to training (a resumed epoch).
        self._epoch = multiprocessing.Value("q", 0, lock=False)
        self._skip = multiprocessing.Value("q", 0, lock=False)

    def configure(self, rank: int, world_size: int, batch_size: int, drop_last: bool) -> None:
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.drop_last = batch_size, drop_last

    # The plan of an epoch depends on these: a resume needs them unchanged (EpochSource).
    RESUME_SETTINGS = ("world_size", "batch_size", "num_workers")

    def start(self, epoch: int, batches: int, batch_size: int) -> None:
        """The next iteration is `epoch`'s, without the rank's first `batches` batches."""
        self._epoch.value = epoch
        self._skip.value = batches

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def __len__(self) -> int:
        """This rank's samples per epoch (the DataLoader's len() divides it by the batch)."""
        total = self.positions
        if self.drop_last:
            return self.batch_size * batches_per_rank(total, self.world_size, self.batch_size, True)
        return samples_per_rank(total, self.world_size)

    def raw_samples(self, worker: int, num_workers: int) -> Iterator[dict]:
        """Undecoded samples of this worker, in this epoch's (shuffled) order."""
        epoch = self.epoch
        segments = worker_segments(
            self.shard_counts,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            epoch=epoch,
            seed=self.seed,
            shuffle=self.shuffle,
            repeats=self.repeats,
        )
        samples = (
            sample
            for segment in segments
            for sample in read_segment(
                join_url(self.split_url, self.shard_names[segment.shard]),
                segment,
                self.repeats.count,
            )
        )
        if not self.shuffle:
            return samples
        seed = f"buffer-{self.seed}-{epoch}-{self.rank}-{worker}"
        return shuffle_buffer(self.buffer_size, rng=random.Random(seed))(samples)

    def decode(self, sample: dict) -> tuple[torch.Tensor, int]:
        suffixes = [key for key in sample if key in IMAGE_SUFFIXES]
        if len(suffixes) != 1:
            raise ValueError(f"expected one image member, found {suffixes or 'none'}")
        return self.transform(sample[suffixes[0]]), int(sample["cls"])

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        taken = self._skip.value
        # A resumed epoch: the DataLoader asks its worker 0 first, so worker k plays the part
        # of the plan's worker (k + taken) mod workers, the one whose turn was next; and that
        # part's samples already handed to training are read, not decoded. Each raw sample is
        # one yielded sample (bad ones included, below), so the count is exact.
        worker = (worker + taken) % num_workers
        batches = batches_per_rank(self.positions, self.world_size, self.batch_size, self.drop_last)
        done = batches_taken(worker, num_workers, batches, taken)
        raw = itertools.islice(self.raw_samples(worker, num_workers), done * self.batch_size, None)
        # A bad sample is replaced by the next good one (the last good one at the end), yielded
        # once more, so that every rank still yields exactly its planned count: unequal counts
        # would hang DDP.
        stream = iter(raw)
        candidates = (
            (f"{sample['__url__']}#{sample['__key__']}", partial(self.decode, sample))
            for sample in stream
        )
        last_good = None
        while True:
            decoded, bad = self.bad_samples.first_good(candidates)
            ended = decoded is None
            if ended:
                if not bad:
                    return
                if last_good is None:
                    raise BadSampleError(
                        f"no readable sample in this worker's part of {self.split_url}, e.g. "
                        f"{bad[0]}: re-convert with `python -m vitrain.data.write_shards SRC DST`."
                    )
                decoded = last_good  # stands in for the bad samples at the end of the stream
            image, target = decoded
            # The good sample, then once more per other bad one it replaces; the first names them.
            yield image, target, tuple(bad)
            yield from [(image, target, ())] * (len(bad) - ended)
            if ended:
                return
            last_good = decoded


class ShardsDataModule(WorkerDecodedDataModule):
    """data=imagenet_shards: the shards of `python -m vitrain.data.write_shards` at data.root (a
    path or an s3://, gs://, http(s):// URL), with data=imagenet's settings and transforms."""

    repair = "Replace it in the source folder and re-convert"

    def __init__(self, *, shuffle_buffer: int = 1000, **settings) -> None:
        super().__init__(**settings)
        if shuffle_buffer < 1:
            raise UserError(f"data.shuffle_buffer={shuffle_buffer} must be a positive integer.")
        self.shuffle_buffer = shuffle_buffer
        self.indexes: dict[str, dict] = {}

    def split_url(self, split: str) -> str:
        return join_url(str(self.root), split)  # a str: Path() would turn s3://b into s3:/b

    def index(self, split: str) -> dict:
        if split not in self.indexes:
            self.indexes[split] = read_index(self.split_url(split))
        return self.indexes[split]

    def split_classes(self, splits: Sequence[str] = SPLITS) -> dict[str, list[str]]:
        return {split: self.index(split)["classes"] for split in splits}

    def dataset(self, split: str) -> ShardDataset:
        return ShardDataset(
            self.split_url(split),
            self.index(split),
            self.sample_transform(split),
            self.bad_samples,
            shuffle=split == "train",
            seed=self.shuffle_seed,
            buffer_size=self.shuffle_buffer,
            repeats=self.repeats if split == "train" else NO_REPEATS,
        )

    def _configured(self, split: str) -> ShardDataset:
        training = split == "train"
        dataset = self.split_dataset(split)
        batch = self.train_per_device_batch(self.epoch) if training else self.per_device_batch_size
        dataset.configure(
            rank=self.rank,
            world_size=self.world_size,
            batch_size=batch,
            drop_last=training,  # timm's Mixup needs equal, even batches
        )
        return dataset

    def build_train_loader(self) -> DataLoader:
        # The dataset cuts whole batches per worker and drops the rank's partial one itself; the
        # DataLoader's drop_last would drop each worker's partial batch, not the rank's.
        dataset = self._configured("train")
        return self.train_loader(dataset, dataset, dataset.batch_size, drop_last=False)

    def build_val_loader(self, batch_size: int) -> DataLoader:
        dataset = self._configured("val")
        return self.dataloader(dataset, batch_size, drop_last=False)
