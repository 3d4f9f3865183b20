"""ImageNet-style ImageFolder data: root/train/<class>/*.JPEG and root/val/<class>/*.JPEG."""

import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from vitrain.data.batching import auto_num_workers, per_device_batch_size
from vitrain.data.decode import DeviceNormalize, sample_transform
from vitrain.data.images import RobustImageFolder
from vitrain.data.transforms import eval_transform, train_transform
from vitrain.errors import UserError, docker_hint

SPLITS = ("train", "val")
# fast: decode.py's uint8 path, normalised on the device; pil: timm's create_transform on PIL
# images, floats made on the CPU. DALI has its own datamodule (data=imagenet_dali).
LOADERS = ("fast", "pil")


class ImageFolderDataModule(pl.LightningDataModule):
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
        pin_memory: bool = True,
        on_bad_sample: str = "skip",
        loader: str = "fast",
    ) -> None:
        super().__init__()
        if loader not in LOADERS:
            hint = " (DALI has its own datamodule: data=imagenet_dali)" if loader == "dali" else ""
            raise UserError(
                f"data.loader={loader} is not one of {', '.join(LOADERS)} for data=imagenet"
                f"{hint}: set data.loader=fast (the default) or data.loader=pil."
            )
        self.loader = loader
        self.root = Path(root)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.num_classes = num_classes
        self.augment = dict(augment)
        self.eval_crop_pct = eval_crop_pct
        self.mean, self.std = list(mean), list(std)
        self.pin_memory = pin_memory
        self.on_bad_sample = on_bad_sample
        self.datasets: dict[str, RobustImageFolder] = {}
        # Turns the fast path's uint8 batches into normalised floats once they are on the device.
        self.device_normalize = DeviceNormalize(self.mean, self.std, self.augment["re_prob"])

    def check(self) -> None:
        """Fail before training, naming the path and the override, if the layout is wrong."""
        # In a container data.root is a path inside it: the fix is the host folder mounted there.
        mount = docker_hint(
            "mount the host folder there; compose mounts IMAGENET_DIR=/host/imagenet "
            "(read-only) at /data/imagenet, and creates an empty folder when it is not set"
        )
        if not self.root.is_dir():
            raise UserError(
                f"data.root={self.root} does not exist: point data.root=/path/to/imagenet at a "
                "folder with train/ and val/ class folders (README 'ImageNet layout'), or run "
                f"experiment=quickstart.{mount}"
            )
        for split in SPLITS:
            split_dir = self.root / split
            try:
                classes = (
                    sorted(p.name for p in split_dir.iterdir() if p.is_dir())
                    if split_dir.is_dir()
                    else []
                )
            except OSError as err:
                raise UserError(
                    f"data.root={self.root}: cannot read {split_dir} ({err.strerror or err}): "
                    f"give this user (id {os.getuid()}) read access to it, or point "
                    "data.root at a readable copy."
                ) from None
            if not classes:
                raise UserError(
                    f"data.root={self.root} has no class folders in {split_dir}: expected "
                    f"{self.root}/{split}/<class>/<image files>. Point data.root=/path/to/imagenet "
                    f"at such a folder (README 'ImageNet layout'), or run experiment=quickstart."
                    f"{mount}"
                )
            if len(classes) != self.num_classes:
                raise UserError(
                    f"data.num_classes={self.num_classes} but {split_dir} has {len(classes)} class "
                    f"folders: set data.num_classes={len(classes)}."
                )

    @property
    def per_device_batch_size(self) -> int:
        world_size = self.trainer.world_size if self.trainer else 1
        return per_device_batch_size(self.batch_size, world_size)

    @property
    def workers(self) -> int:
        if self.num_workers == "auto":
            return auto_num_workers(self.trainer.num_devices if self.trainer else 1)
        return int(self.num_workers)

    def _decoding(self, split: str) -> dict:
        """RobustImageFolder's transform and loader for the split and data.loader."""
        if self.loader == "fast":
            decode = sample_transform(
                split,
                self.image_size,
                self.augment,
                self.eval_crop_pct,
                self.augment["interpolation"],
                mean=tuple(self.mean),
            )
            return {"transform": None, "loader": decode}
        if split == "train":
            transform = train_transform(self.image_size, self.augment, self.mean, self.std)
        else:
            transform = eval_transform(
                self.image_size,
                self.eval_crop_pct,
                self.augment["interpolation"],
                self.mean,
                self.std,
            )
        return {"transform": transform}

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            if split not in self.datasets:
                try:
                    self.datasets[split] = RobustImageFolder(
                        self.root / split, on_bad_sample=self.on_bad_sample, **self._decoding(split)
                    )
                except FileNotFoundError as err:
                    raise UserError(f"data.root={self.root}: {err}") from None

    @property
    def pins_memory(self) -> bool:
        """data.pin_memory where batches go to a CUDA device: page-locked batches make that copy
        asynchronous; for a CPU run they only cost locked memory (and torch warns)."""
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        return bool(self.pin_memory) and cuda

    def _loader(self, split: str) -> DataLoader:
        workers = self.workers
        training = split == "train"
        return DataLoader(
            self.datasets[split],
            batch_size=self.per_device_batch_size,
            shuffle=training,
            drop_last=training,  # timm's Mixup needs equal, even batches
            num_workers=workers,
            pin_memory=self.pins_memory,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """fast: uint8 images -> normalised floats (+ random erasing when training), on the
        device (Lightning calls this after moving the batch, for every split)."""
        if self.loader != "fast":
            return batch
        images, targets, bad_files = batch
        training = self.trainer is not None and self.trainer.training
        return type(batch)((self.device_normalize(images, training), targets, bad_files))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")
