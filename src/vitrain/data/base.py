"""What every image source shares, in two layers:

ImageDataModule          the dataset facts (root, classes, image size, mean/std, augmentations),
                         the layout check, the per-device batch and worker sizing, and the
                         device-side normalise/erase. DALI builds on this alone.
WorkerDecodedDataModule  + the sources whose samples DataLoader workers decode on the CPU
                         (ImageFolder files, tar shards): data.loader (fast | pil), the bad-sample
                         rule, pinning, and the DataLoader settings.

Each source (imagefolder.py, shards.py, dali.py, digits.py) holds only what differs.
"""

import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, Dataset

from vitrain.data.bad_samples import BadSamplePolicy
from vitrain.data.batch import Batch, collate_samples
from vitrain.data.decode_fast import FastSampleTransform
from vitrain.data.decode_pil import Encoded, PilSampleTransform
from vitrain.data.epochs import EpochPosition, EpochSource, Repeats, ResumableLoader
from vitrain.data.layout import SPLITS, STAGE_SPLITS, Listing, check_classes, list_split
from vitrain.data.on_device import DeviceAugment
from vitrain.data.resolution import ResolutionPlan
from vitrain.data.sizing import auto_num_workers, per_device_batch_size
from vitrain.errors import UserError, docker_hint
from vitrain.runtime import training_device

LOADERS = ("fast", "pil")
NOT_RESUMABLE = "You're resuming from a checkpoint that ended before the epoch ended"
LAYOUT_FIX = (
    "point data.root=/path/to/imagenet at a folder with train/ and val/ class folders "
    "(README 'Training on ImageNet'; eval.py reads val/ alone), or run experiment=quickstart"
)
# Why eval.py reads train/ too for a checkpoint without class names, and what else would do.
UNNAMED_FIX = (
    "eval.py needs train/ here: data.classes is not given, and ckpt_path records no class names "
    "(a checkpoint written before runs recorded them), so train/'s sorted class folders name "
    "the model's classes. Point data.root at the training run's data with its train/, or give "
    "data.classes=[...] (those folder names, sorted)"
)
# In a container data.root is a path inside it: the fix is the host folder mounted there.
MOUNT_FIX = (
    "mount the host folder there; compose mounts IMAGENET_DIR=/host/imagenet (read-only) at "
    "/data/imagenet, and creates an empty folder when it is not set"
)


class ImageDataModule(pl.LightningDataModule):
    """The facts of an image dataset and what follows from them for every source.

    The constructor's arguments are saved as the datamodule's hyper-parameters, so every
    checkpoint carries them (Lightning's `datamodule_hyper_parameters`): evaluation and export
    read the image size, mean/std, eval crop and class names of the run from there.

    classes: the class names behind the class indices, index = position. None (a training run):
    train/'s sorted class folders (a shard index's classes), which check() records in the
    hyper-parameters; given (eval.py: the checkpoint's), every split read must have them, and
    validation alone does not read train/.
    """

    def __init__(
        self,
        root: str,
        batch_size: int,
        num_workers: int | str,
        image_size: int,
        num_classes: int,
        augment: dict,
        eval_crop_pct: float,
        mean: list[float],
        std: list[float],
        train_image_size: int | None = None,
        resolution_schedule: dict | None = None,
        batch_size_schedule: str = "constant",
        classes: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = root
        self.batch_size = batch_size  # global; Lightning's batch-size finder may change it
        if num_workers != "auto" and (not isinstance(num_workers, int) or num_workers < 0):
            raise UserError(  # here, not when the loader is built: before anything runs
                f"data.num_workers={num_workers} must be 0 (load in the training process), "
                "a positive number of worker processes, or auto."
            )
        self.num_workers = num_workers
        self.image_size = image_size
        self.num_classes = num_classes
        self.classes = list(classes) if classes is not None else None
        self.augment = dict(augment)
        self.eval_crop_pct = eval_crop_pct
        self.mean, self.std = list(mean), list(std)
        self.device_augment = DeviceAugment(self.mean, self.std, self.augment)
        self.resolution = ResolutionPlan(
            image_size,
            train_image_size or image_size,
            dict(resolution_schedule) if resolution_schedule else None,
            batch_size_schedule,
        )
        self._listings: dict[str, Listing] = {}

    # --- the layout ----------------------------------------------------------------------
    def listing(self, split: str) -> Listing:
        """root/<split> listed once (ImageFolder, DALI); its errors say which data.root to fix."""
        if split not in self._listings:
            try:
                self._listings[split] = list_split(self.root_path / split)
            except UserError as err:
                raise UserError(
                    f"data.root={self.root}: {err}; {LAYOUT_FIX}.{docker_hint(MOUNT_FIX)}"
                ) from None
        return self._listings[split]

    @property
    def root_path(self) -> Path:
        return Path(self.root)

    def split_classes(self, splits: Sequence[str] = SPLITS) -> dict[str, list[str]]:
        """The class names of each of `splits`; sources with another layout (shards) override
        this."""
        if self.root_path.exists() and not self.root_path.is_dir():
            raise UserError(f"data.root={self.root} is a file, not a folder: {LAYOUT_FIX}.")
        if not self.root_path.is_dir():
            raise UserError(
                f"data.root={self.root} does not exist: {LAYOUT_FIX}.{docker_hint(MOUNT_FIX)}"
            )
        return {split: self.listing(split).classes for split in splits}

    def check(self, stage: str = "fit") -> None:
        """Fail before the run, naming the value and the fix, if the splits that `stage` reads
        (fit: train/ and val/; validate: val/) are not usable; then record the class names."""
        splits = STAGE_SPLITS[stage]
        if self.classes is None and "train" not in splits:
            try:  # train/'s folders name the classes
                self.split_classes(("train",))
            except UserError as err:
                raise UserError(f"{err} {UNNAMED_FIX}.") from None
            splits = SPLITS
        found = self.split_classes(splits)
        check_classes(found, self.num_classes, where=str(self.root), named=self.classes)
        if self.classes is None:
            # In the hyper-parameters, which every checkpoint carries (Lightning logs the
            # constructor's own, hparams_initial): eval.py and the export read them there.
            self.hparams["classes"] = found["train"]

    # --- sizes -----------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer else 0

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer else 1

    @property
    def rank(self) -> int:
        return self.trainer.global_rank if self.trainer else 0

    @property
    def per_device_batch_size(self) -> int:
        """The evaluation batch per device (and the training one at a constant batch)."""
        return per_device_batch_size(self.batch_size, self.world_size)

    def global_train_batch(self, epoch: int) -> int:
        """The global training batch of `epoch` (data.batch_size_schedule)."""
        return self.resolution.global_batch(self.batch_size, epoch, self.world_size, even=True)

    def train_per_device_batch(self, epoch: int) -> int:
        return per_device_batch_size(self.global_train_batch(epoch), self.world_size)

    @property
    def workers(self) -> int:
        """data.num_workers, or with `auto` this process's share of the node's CPUs."""
        if self.num_workers == "auto":
            return auto_num_workers(self.trainer.num_devices if self.trainer else 1)
        return self.num_workers

    # --- on the device ---------------------------------------------------------------------
    def prepare_batch(self, batch: Batch, training: bool) -> Batch:
        """The batch as the model takes it, once on the device: normalised (the fast path's
        uint8 images), and erased at random when training."""
        return batch._replace(images=self.device_augment(batch.images, training))

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        training = self.trainer is not None and self.trainer.training
        return self.prepare_batch(batch, training)


class WorkerDecodedDataModule(ImageDataModule):
    """Sources whose samples DataLoader workers decode: ImageFolder files and tar shards.

    loader: fast (vitrain.data.decode_fast: uint8 crops, normalised on the device) or pil
    (timm's create_transform on PIL images: the reference). on_bad_sample: the bad-sample rule.
    pin_memory: page-locked batches for an asynchronous copy, where batches go to a CUDA device.
    shuffle_seed: each epoch's order depends on it and the epoch alone. repeated_aug,
    repeated_aug_epoch: repeated augmentation of the training samples (vitrain.data.epochs.Repeats).

    The training loader resumes mid-epoch exactly (vitrain.data.epochs): the datamodule's
    state, in every checkpoint, is how far the training epoch had got.
    """

    # How to repair one unreadable file of this source, for the bad-sample rule's error.
    repair = "Remove or replace it"

    def __init__(
        self,
        *,
        loader: str = "fast",
        pin_memory: bool = True,
        on_bad_sample: str = "skip",
        shuffle_seed: int = 0,
        repeated_aug: int = 1,
        repeated_aug_epoch: str = "dataset",
        **facts,
    ) -> None:
        super().__init__(**facts)
        self.shuffle_seed = shuffle_seed
        self.repeats = Repeats(repeated_aug, repeated_aug_epoch)
        self._train_loader: ResumableLoader | None = None
        self._train_shape: tuple[int, int] | None = None  # its image size and batch
        self._val_loader: DataLoader | None = None
        self._val_batch: int | None = None
        self._resume: EpochPosition | None = None  # from the checkpoint, for the train loader
        if loader not in LOADERS:
            hint = " (DALI has its own data option: data=imagenet_dali)" if loader == "dali" else ""
            raise UserError(
                f"data.loader={loader} is not one of {', '.join(LOADERS)}{hint}: set "
                "data.loader=fast (the default) or data.loader=pil."
            )
        self.loader = loader
        self.pin_memory = pin_memory
        self.bad_samples = BadSamplePolicy(on_bad_sample, self.repair)
        self.datasets: dict[str, Dataset] = {}

    # --- the datasets ---------------------------------------------------------------------
    def dataset(self, split: str) -> Dataset:
        """The split's dataset, its samples decoded by sample_transform(split): the source's."""
        raise NotImplementedError

    def setup(self, stage: str = "fit") -> None:
        for split in STAGE_SPLITS[stage]:
            if split not in self.datasets:
                self.datasets[split] = self.dataset(split)

    def split_dataset(self, split: str) -> Dataset:
        """The split's dataset for a new loader: the training one at this epoch's size when the
        size varies."""
        if split == "train" and self.resolution.varies:
            self.datasets[split] = self.dataset(split)
        return self.datasets[split]

    # --- the loaders: built again only when what they deliver changes ----------------------
    def train_dataloader(self) -> DataLoader:
        """This epoch's training loader. With a resolution schedule Lightning asks for one every
        epoch; the last one is kept while the epoch's size and batch stay the same, so that its
        persistent workers carry on instead of starting and filling their queues anew."""
        shape = (self.resolution.size(self.epoch), self.train_per_device_batch(self.epoch))
        if self._train_loader is None or shape != self._train_shape:
            self._train_loader, self._train_shape = self.build_train_loader(), shape
        return self._train_loader

    def val_dataloader(self) -> DataLoader:
        """The validation loader, built again only for another batch (the batch-size finder)."""
        batch = self.per_device_batch_size
        if self._val_loader is None or batch != self._val_batch:
            self._val_loader, self._val_batch = self.build_val_loader(batch), batch
        return self._val_loader

    def build_train_loader(self) -> ResumableLoader:
        """The source's training loader for this epoch (made with `train_loader`)."""
        raise NotImplementedError

    def build_val_loader(self, batch_size: int) -> DataLoader:
        """The source's validation loader (made with `dataloader`)."""
        raise NotImplementedError

    def sample_transform(self, split: str) -> Callable[[Encoded], torch.Tensor]:
        """Encoded image (a path or its bytes) -> the split's sample, for data.loader, at the
        size the split has now (training: this epoch's)."""
        size = self.resolution.size(self.epoch) if split == "train" else self.image_size
        if self.loader == "fast":
            return FastSampleTransform(
                split,
                size,
                self.augment,
                self.eval_crop_pct,
                self.augment["interpolation"],
                mean=tuple(self.mean),
            )
        crop_pct = self.eval_crop_pct
        return PilSampleTransform(split, size, self.augment, crop_pct, self.mean, self.std)

    @property
    def pins_memory(self) -> bool:
        """data.pin_memory where batches go to a CUDA device: for a CPU run pinning only costs
        locked memory (and torch warns)."""
        return bool(self.pin_memory) and training_device(self.trainer).type == "cuda"

    # --- the training epoch's position, in every checkpoint --------------------------------
    def state_dict(self) -> dict:
        position = self._train_loader.position() if self._train_loader is not None else None
        return {"train_position": position._asdict()} if position is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        position = state_dict.get("train_position")
        self._resume = EpochPosition(**position) if position else None

    def _take_resume(self) -> EpochPosition | None:
        """The checkpoint's position, to the first training epoch that starts, and only to it."""
        resume, self._resume = self._resume, None
        return resume

    def train_loader(
        self, dataset: Dataset, source: EpochSource, batch_size: int, **sampling
    ) -> ResumableLoader:
        """The training DataLoader, continuing the epoch the checkpoint stopped in; drop_last
        unless `sampling` says otherwise (timm's Mixup needs equal, even batches)."""
        loader_class = partial(
            ResumableLoader,
            source=source,
            epoch_of=lambda: self.epoch,
            world_size=self.world_size,
            resume=self._take_resume,
        )
        sampling.setdefault("drop_last", True)
        # Lightning checks only its own loader-state route (vitrain.data.epochs says why it is
        # not used) and would call this resumable loader "not resumable" on every resume.
        warnings.filterwarnings("ignore", message=NOT_RESUMABLE, category=PossibleUserWarning)
        return self.dataloader(dataset, batch_size, loader_class, **sampling)

    def dataloader(
        self,
        dataset: Dataset,
        batch_size: int,
        loader_class: Callable[..., DataLoader] = DataLoader,
        **sampling,
    ) -> DataLoader:
        """The DataLoader settings every worker-decoded source shares; `sampling` says how
        this source orders and cuts its samples (shuffle, drop_last)."""
        workers = self.workers
        return loader_class(
            dataset,
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=collate_samples,
            pin_memory=self.pins_memory,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            **sampling,
        )
