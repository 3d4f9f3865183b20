"""NVIDIA DALI input pipeline (data=imagenet_dali): the ImageFolder layout decoded by nvJPEG on
the GPU ("mixed" backend), or by DALI's CPU backend where there is no GPU.

The same recipe as data=imagenet: RandomResizedCrop (augment.scale / ratio, decoding only the crop),
flip, RandAugment (DALI's own, see rand_augment_kwargs for what differs from timm's),
normalisation with data.mean / std, and timm's RandomErasing on the device batch; eval: resize the
shorter side to image_size / eval_crop_pct, centre crop. Batches are (images, targets, bad_files)
like ImageFolder's.

DALI is optional (pip install -e .[dali]): nothing here imports it before a loader is built.
"""

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from vitrain.data.batching import auto_num_workers, per_device_batch_size
from vitrain.data.decode import DeviceRandomErasing
from vitrain.errors import UserError

DEVICES = ("auto", "gpu", "cpu")
SPLITS = ("train", "val")
READER = "reader"  # the iterator finds the epoch size and the shards through the reader's name
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# Different seeds per rank for the augmentations; the same epoch order on every rank for sharding.
_RANK_SEED_STRIDE = 1009


def require_dali() -> None:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise UserError(
            "data=imagenet_dali needs NVIDIA DALI, which is not installed: pip install -e .[dali] "
            "(nvidia-dali-cuda130), or use data=imagenet."
        ) from None


def resolve_device(device: str, on_gpu: bool) -> str:
    """auto: decode on the GPU (nvJPEG) when training runs on one, DALI's CPU backend otherwise."""
    if device not in DEVICES:
        raise UserError(f"data.device={device} is not one of {', '.join(DEVICES)}.")
    if device == "auto":
        return "gpu" if on_gpu else "cpu"
    if device == "gpu" and not on_gpu:
        raise UserError(
            "data.device=gpu but training does not run on a CUDA GPU (none visible, or "
            "trainer.accelerator=cpu): use data.device=cpu (DALI's CPU backend) or "
            "data.device=auto."
        )
    return device


def image_files(split_dir: Path) -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, class names) exactly as torchvision's ImageFolder lists them, so that labels
    agree with data=imagenet and checkpoints move between the two."""
    try:
        classes, class_to_idx = find_classes(str(split_dir))
        samples = make_dataset(str(split_dir), class_to_idx, IMG_EXTENSIONS)
    except (FileNotFoundError, NotADirectoryError) as err:
        raise UserError(
            f"{split_dir}: {err}. Expected {split_dir}/<class>/<image files>: point data.root at "
            "a folder with train/ and val/ class folders (README 'ImageNet layout')."
        ) from None
    return [path for path, _ in samples], [label for _, label in samples], classes


def rand_augment_kwargs(config: str) -> dict:
    """timm's RandAugment string ("rand-m9-mstd0.5-inc1") -> DALI's rand_augment() kwargs.

    Same: n ops per image (timm's default 2), magnitude m on timm's scale (bins 0..mmax, mmax 10),
    inc1 = magnitudes that grow with m (DALI's monotonic_mag), rotate 30 deg, shear 0.3, translate
    0.45 of the image, enhance 1 +- 0.9 * m / mmax. Differs: timm applies each chosen op with
    probability 0.5 and draws its magnitude from N(m, mstd) per op, DALI applies both ops at the
    fixed m (an identity op in its suite plays the skipped op's part); DALI's suite lacks Invert and
    SolarizeAdd; the fill colour is one grey level (timm: the mean colour); rotate and shear
    interpolate bilinearly (timm: bicubic).
    """
    name, *parts = config.split("-")
    if name != "rand":
        raise UserError(
            f"data.augment.auto_augment={config}: data=imagenet_dali offers DALI's RandAugment "
            "only (rand-m<M>[-n<N>][-mstd<S>][-inc<0|1>][-mmax<MAX>], e.g. rand-m9-mstd0.5-inc1): "
            "use data=imagenet for timm's other policies, or data.augment.auto_augment=null."
        )
    settings = {"m": "10", "n": "2", "inc": "0", "mmax": "10", "mstd": "0"}
    for part in parts:
        key = next((k for k in ("mstd", "mmax", "inc", "m", "n") if part.startswith(k)), None)
        if key is None:
            raise UserError(
                f"data.augment.auto_augment={config}: '{part}' is not one of m, n, mstd, inc, "
                "mmax, the RandAugment settings DALI can follow; drop it or use data=imagenet."
            )
        settings[key] = part[len(key) :]
    try:
        magnitude, ops, mmax = (float(settings[k]) for k in ("m", "n", "mmax"))
    except ValueError:
        raise UserError(
            f"data.augment.auto_augment={config}: m, n and mmax must be numbers, e.g. "
            "rand-m9-mstd0.5-inc1."
        ) from None
    if not (magnitude.is_integer() and ops.is_integer() and mmax.is_integer()):
        raise UserError(
            f"data.augment.auto_augment={config}: DALI's magnitudes are whole bins: use whole "
            "numbers for m, n and mmax, e.g. rand-m9-mstd0.5-inc1."
        )
    if not 0 <= magnitude <= mmax:
        raise UserError(f"data.augment.auto_augment={config}: m must lie in 0..{int(mmax)}.")
    return {
        "n": int(ops),
        "m": int(magnitude),
        "num_magnitude_bins": int(mmax) + 1,  # bin m of mmax + 1 = magnitude m / mmax, as timm
        "monotonic_mag": settings["inc"] == "1",
        "max_translate_rel": 0.45,  # timm's translate_pct
    }


def _interp_type(interpolation: str):
    from nvidia.dali import types

    if interpolation not in INTERPOLATIONS:
        raise UserError(
            f"data.augment.interpolation={interpolation}: data=imagenet_dali supports "
            f"{', '.join(INTERPOLATIONS)}."
        )
    return {
        "bilinear": types.INTERP_LINEAR,
        "bicubic": types.INTERP_CUBIC,
        "nearest": types.INTERP_NN,
    }[interpolation]


def _normalize(images, mean: list[float], std: list[float], **crop_or_mirror):
    """uint8 HWC 0..255 -> float CHW (x / 255 - mean) / std, i.e. ToTensor + Normalize."""
    from nvidia.dali import fn, types

    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="CHW",
        mean=[255 * m for m in mean],
        std=[255 * s for s in std],
        **crop_or_mirror,
    )


def _train_pipeline(files, labels, shard_id, num_shards, epoch_seed, decoder, opts):
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug import rand_augment

    jpegs, targets = fn.readers.file(
        files=files,
        labels=labels,
        name=READER,
        shard_id=shard_id,
        num_shards=num_shards,
        # The whole list in a new order every epoch, the same order on every rank (one seed), so
        # the shards stay disjoint: DistributedSampler's semantics. random_shuffle would only
        # shuffle within a 1024-file buffer of the class-sorted list.
        shuffle_after_epoch=True,
        shuffle_after_epoch_seed=epoch_seed,
        pad_last_batch=True,  # a shard's last batch never borrows files from the next shard
    )
    size = opts["image_size"]
    augment = opts["augment"]
    # RandomResizedCrop's area / aspect-ratio sampling (10 tries, then a centre crop), decoding
    # only the crop region; its quantiles match torchvision's get_params (tests/test_dali.py).
    images = fn.decoders.image_random_crop(
        jpegs,
        device=decoder,
        output_type=types.RGB,
        random_area=list(augment["scale"]),
        random_aspect_ratio=list(augment["ratio"]),
        num_attempts=10,
    )
    interp = _interp_type(augment["interpolation"])
    images = fn.resize(images, size=[size, size], interp_type=interp)
    if augment.get("auto_augment"):
        images = rand_augment.rand_augment(
            images,
            shape=(size, size),
            fill_value=round(255 * sum(opts["mean"]) / 3),
            **rand_augment_kwargs(augment["auto_augment"]),
        )
    # The flip after RandAugment, fused into the normalisation: its ops are mirror-symmetric in
    # distribution (shear / translate / rotate signs are random), so the order does not matter.
    mirror = fn.random.coin_flip(probability=augment["hflip"])
    images = _normalize(images, opts["mean"], opts["std"], mirror=mirror)
    return images, targets.gpu() if decoder == "mixed" else targets


def _val_pipeline(files, labels, shard_id, num_shards, epoch_seed, decoder, opts):
    from nvidia.dali import fn, types

    jpegs, targets = fn.readers.file(
        files=files,
        labels=labels,
        name=READER,
        shard_id=shard_id,
        num_shards=num_shards,
        stick_to_shard=True,
        pad_last_batch=True,  # padding DALI drops again (LastBatchPolicy.PARTIAL)
    )
    size = opts["image_size"]
    images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
    images = fn.resize(
        images,
        resize_shorter=math.floor(size / opts["eval_crop_pct"]),  # timm's eval scale_size
        interp_type=_interp_type(opts["augment"]["interpolation"]),
    )
    images = _normalize(images, opts["mean"], opts["std"], crop=(size, size))  # centred
    return images, targets.gpu() if decoder == "mixed" else targets


class DaliLoader:
    """Iterable of (images, targets, bad_files) batches from DALI, `batches` per pass.

    images: float32 (N, 3, size, size), normalised; targets: int64 (N,); both on the pipeline's
    device (cuda:device_id, or the CPU for DALI's CPU backend), so Lightning's transfer is a no-op.
    bad_files: N empty strings, the shape ImageFolder batches have: DALI cannot skip a corrupt file
    (its decoder stops the pipeline, without naming the file), so a bad file ends the run with a
    UserError instead (find such files with `python -m vitrain.data.check DATA_ROOT`).

    Each pass builds a fresh pipeline, shuffled with seed + epoch (the trainer's epoch when there
    is one, so a resumed run continues the sequence; else the pass count), because a DALI iterator
    cannot restart mid-epoch and Lightning stops passes early (sanity check, limit_*_batches).
    """

    def __init__(
        self,
        build: Callable[[int], object],
        batches: int,
        split_dir: Path,
        epoch: Callable[[], int] | None = None,
    ) -> None:
        self.build = build
        self.batches = batches
        self.split_dir = split_dir
        self.epoch = epoch
        self.passes = 0
        self._running: Iterator | None = None

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        if self._running is not None:
            self._running.close()  # frees the previous pass's pipeline before the next one
        self._running = self._pass(self.epoch() if self.epoch else self.passes)
        self.passes += 1
        return self._running

    def _pass(self, number: int):
        iterator = None
        try:
            iterator = self.build(number)  # DALI's iterator reads the first batch right away
            for _ in range(self.batches):
                outputs = next(iterator)[0]
                images, targets = outputs["images"], outputs["targets"]
                yield images, targets.reshape(-1).long(), [""] * len(targets)
        except RuntimeError as err:  # DALI's pipeline errors
            raise UserError(
                f"DALI stopped reading {self.split_dir}: {str(err).strip().splitlines()[-1]}. "
                "Usually an unreadable image (DALI cannot skip one): list them with "
                f"`python -m vitrain.data.check {self.split_dir.parent}`, remove them, or use "
                "data=imagenet (which skips them)."
            ) from None
        finally:
            del iterator  # the pipeline's threads and buffers go with it


def _loader(
    split: str,
    split_dir: Path,
    listing: tuple[list[str], list[int], list[str]],
    batch_size: int,
    threads: int,
    opts: dict,
    decoder: str,
    shard_id: int,
    num_shards: int,
    device_id: int | None,
    seed: int,
    epoch: Callable[[], int] | None = None,
) -> DaliLoader:
    """decoder: "mixed" (nvJPEG on cuda:device_id) or "cpu" (device_id None); epoch: the number
    that seeds each pass's file order (default: the pass count)."""
    require_dali()
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    files, labels, _ = listing
    if split == "val" and len(files) % num_shards:
        # Equal shards, so every rank runs the same batches and none gets an empty last one: the
        # first few files once more (fewer than the world size), as DistributedSampler pads.
        extra = num_shards - len(files) % num_shards
        files, labels = files + files[:extra], labels + labels[:extra]
    shard = len(files) // num_shards
    if split == "train":
        batches = shard // batch_size  # drop the last partial batch: mixup needs equal batches
        if batches == 0:
            raise UserError(
                f"{split_dir} has {len(files)} images, fewer than one batch of {batch_size} per "
                f"device over {num_shards} devices: lower data.batch_size."
            )
    else:
        batches = math.ceil(shard / batch_size)
    body = _train_pipeline if split == "train" else _val_pipeline
    pipeline = pipeline_def(body, enable_conditionals=True)  # conditionals: RandAugment's choice

    def build(number: int) -> DALIGenericIterator:
        return DALIGenericIterator(
            [
                pipeline(
                    files,
                    labels,
                    shard_id,
                    num_shards,
                    seed + number,
                    decoder,
                    opts,
                    batch_size=batch_size,
                    num_threads=threads,
                    device_id=device_id,
                    seed=seed + number + _RANK_SEED_STRIDE * (shard_id + 1),
                )
            ],
            ["images", "targets"],
            reader_name=READER,
            # train: the pass stops after `batches` full batches; val: the last batch holds just
            # the shard's remaining files (DALI drops its padding).
            last_batch_policy=LastBatchPolicy.PARTIAL,
        )

    return DaliLoader(build, batches, split_dir, epoch)


def dali_train_loader(
    root: str | Path,
    batch_size: int,
    threads: int,
    image_size: int,
    augment: dict,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    device: str = "auto",
    shard_id: int = 0,
    num_shards: int = 1,
    device_id: int | None = None,
    seed: int = 0,
) -> DaliLoader:
    """DALI's training loader over root/train/<class>/* (for bench/loader.py and the datamodule).

    Returns a DaliLoader: len() = floor(images / num_shards / batch_size) full batches per pass of
    (images float32 (batch, 3, size, size) normalised, targets int64 (batch,), bad_files), on the
    GPU with device "gpu" (nvJPEG), on the CPU with "cpu". Random erasing (augment.re_prob) is not
    in it: the datamodule applies it to the device batch, as the fast path does.
    """
    opts = {"image_size": image_size, "augment": dict(augment), "mean": mean, "std": std}
    on_gpu = torch.cuda.is_available()
    if resolve_device(device, on_gpu) == "cpu":
        decoder, device_id = "cpu", None
    else:
        decoder = "mixed"
        device_id = torch.cuda.current_device() if device_id is None else device_id
    split_dir = Path(root) / "train"
    return _loader(
        "train", split_dir, image_files(split_dir), batch_size, threads, opts, decoder, shard_id,
        num_shards, device_id, seed,
    )  # fmt: skip


class DaliDataModule(pl.LightningDataModule):
    """data=imagenet_dali: the ImageFolder layout through DALI, sharded over the DDP ranks."""

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
        on_bad_sample: str = "error",
        loader: str = "dali",
        device: str = "auto",
        threads: int | str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.threads = threads
        self.num_classes = num_classes
        self.device = device
        self.seed = seed
        self.loader = loader
        self.on_bad_sample = on_bad_sample
        self.listings: dict[str, tuple[list[str], list[int], list[str]]] = {}
        self.opts = {
            "image_size": image_size,
            "augment": dict(augment),
            "eval_crop_pct": eval_crop_pct,
            "mean": list(mean),
            "std": list(std),
        }
        # pin_memory does not apply: DALI hands over batches already on the device.
        self.random_erasing = DeviceRandomErasing(augment["re_prob"])

    def check(self) -> None:
        """Fail before training (train.py calls this; Hydra would wrap errors raised in
        __init__), naming the value and the fix: DALI missing, settings DALI cannot honour, a
        wrong folder layout."""
        require_dali()
        if self.loader != "dali":
            raise UserError(
                f"data.loader={self.loader} with data=imagenet_dali, which reads with DALI only: "
                f"for the {self.loader} loader use data=imagenet data.loader={self.loader}."
            )
        if self.on_bad_sample != "error":
            raise UserError(
                f"data.on_bad_sample={self.on_bad_sample} is not available with "
                "data=imagenet_dali: DALI's decoder cannot skip an unreadable file. Set "
                "data.on_bad_sample=error (and "
                "check the folder with `python -m vitrain.data.check DATA_ROOT`), or use "
                "data=imagenet to skip bad files."
            )
        if self.device not in DEVICES:
            raise UserError(f"data.device={self.device} is not one of {', '.join(DEVICES)}.")
        if self.opts["augment"].get("auto_augment"):
            rand_augment_kwargs(self.opts["augment"]["auto_augment"])  # a bad string fails now
        for split in SPLITS:
            self.listings[split] = image_files(self.root / split)
            classes = self.listings[split][2]
            if len(classes) != self.num_classes:
                raise UserError(
                    f"data.num_classes={self.num_classes} but {self.root / split} has "
                    f"{len(classes)} class folders: set data.num_classes={len(classes)}."
                )

    @property
    def dali_threads(self) -> int:
        """data.threads, or data.num_workers' value (auto: the CPUs per device)."""
        threads = self.num_workers if self.threads == "auto" else self.threads
        if threads == "auto":
            return auto_num_workers(self.trainer.num_devices if self.trainer else 1)
        return int(threads)

    def _loader(self, split: str) -> DaliLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        root_device = trainer.strategy.root_device if trainer else torch.device("cpu")
        # DALI writes its batches straight into this rank's device: Lightning's transfer is a no-op.
        if resolve_device(self.device, root_device.type == "cuda") == "gpu":
            decoder, device_id = "mixed", root_device.index
        else:
            decoder, device_id = "cpu", None
        if split not in self.listings:
            self.listings[split] = image_files(self.root / split)
        batch = per_device_batch_size(self.batch_size, world)
        epoch = (lambda: trainer.current_epoch) if trainer else None
        return _loader(
            split, self.root / split, self.listings[split], batch, self.dali_threads, self.opts,
            decoder, rank, world, device_id, self.seed, epoch,
        )  # fmt: skip

    def train_dataloader(self) -> DaliLoader:
        return self._loader("train")

    def val_dataloader(self) -> DaliLoader:
        return self._loader("val")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """timm's RandomErasing ("pixel" mode, per image) on training batches, on the device."""
        if not (self.trainer and self.trainer.training):
            return batch
        images, targets, bad_files = batch
        return self.random_erasing(images), targets, bad_files
