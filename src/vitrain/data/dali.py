"""NVIDIA DALI input pipeline (data=imagenet_dali): the ImageFolder layout decoded by nvJPEG on
the GPU ("mixed" backend), or by DALI's CPU backend where there is no GPU.

The same recipe as data=imagenet: RandomResizedCrop (augment.scale / ratio, decoding only the crop),
flip, RandAugment (DALI's own, see rand_augment_kwargs for what differs from timm's),
normalisation with data.mean / std, and timm's RandomErasing on the device batch; eval: resize the
shorter side to image_size / eval_crop_pct, centre crop. Batches are (images, targets, bad_files)
(vitrain.data.batch.Batch) like every source's.

DALI is optional (pip install -e .[dali]): nothing here imports it before a loader is built.
"""

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vitrain.data.augmentation import check_augment
from vitrain.data.base import ImageDataModule
from vitrain.data.batch import Batch
from vitrain.errors import UserError
from vitrain.runtime import training_device

DEVICES = ("auto", "gpu", "cpu")
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


@dataclass(frozen=True)
class DaliPlan:
    """What one rank's pipeline for one split reads, and how."""

    split: str
    split_dir: Path
    files: tuple[str, ...]
    labels: tuple[int, ...]
    batch_size: int  # per device
    threads: int
    decoder: str  # "mixed" (nvJPEG on cuda:device_id) or "cpu"
    device_id: int | None
    shard_id: int  # this rank
    num_shards: int  # the world size
    seed: int
    image_size: int
    augment: dict
    eval_crop_pct: float
    mean: list[float]
    std: list[float]

    @property
    def batches(self) -> int:
        """Batches per pass: full batches only for training (mixup needs equal batches)."""
        shard = len(self.files) // self.num_shards
        if self.split == "train":
            return shard // self.batch_size
        return math.ceil(shard / self.batch_size)


def _read_files(plan: DaliPlan, **order):
    from nvidia.dali import fn

    return fn.readers.file(
        files=list(plan.files),
        labels=list(plan.labels),
        name=READER,
        shard_id=plan.shard_id,
        num_shards=plan.num_shards,
        pad_last_batch=True,  # a shard's last batch never borrows files from the next shard
        **order,
    )


def _train_pipeline(plan: DaliPlan, epoch_seed: int):
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug import rand_augment

    # The whole list in a new order every epoch, the same order on every rank (one seed), so the
    # shards stay disjoint: DistributedSampler's semantics. random_shuffle would only shuffle
    # within a 1024-file buffer of the class-sorted list.
    jpegs, targets = _read_files(
        plan, shuffle_after_epoch=True, shuffle_after_epoch_seed=epoch_seed
    )
    size, augment = plan.image_size, plan.augment
    # RandomResizedCrop's area / aspect-ratio sampling (10 tries, then a centre crop), decoding
    # only the crop region; its quantiles match torchvision's get_params (tests/test_dali.py).
    images = fn.decoders.image_random_crop(
        jpegs,
        device=plan.decoder,
        output_type=types.RGB,
        random_area=list(augment["scale"]),
        random_aspect_ratio=list(augment["ratio"]),
        num_attempts=10,
    )
    images = fn.resize(
        images, size=[size, size], interp_type=_interp_type(augment["interpolation"])
    )
    if augment.get("auto_augment"):
        images = rand_augment.rand_augment(
            images,
            shape=(size, size),
            fill_value=round(255 * sum(plan.mean) / 3),
            **rand_augment_kwargs(augment["auto_augment"]),
        )
    # The flip after RandAugment, fused into the normalisation: its ops are mirror-symmetric in
    # distribution (shear / translate / rotate signs are random), so the order does not matter.
    mirror = fn.random.coin_flip(probability=augment["hflip"])
    images = _normalize(images, plan.mean, plan.std, mirror=mirror)
    return images, targets.gpu() if plan.decoder == "mixed" else targets


def _val_pipeline(plan: DaliPlan, epoch_seed: int):
    from nvidia.dali import fn, types

    # stick_to_shard, and the padding DALI drops again (LastBatchPolicy.PARTIAL).
    jpegs, targets = _read_files(plan, stick_to_shard=True)
    images = fn.decoders.image(jpegs, device=plan.decoder, output_type=types.RGB)
    images = fn.resize(
        images,
        resize_shorter=math.floor(plan.image_size / plan.eval_crop_pct),  # timm's scale_size
        interp_type=_interp_type(plan.augment["interpolation"]),
    )
    crop = (plan.image_size, plan.image_size)  # centred
    images = _normalize(images, plan.mean, plan.std, crop=crop)
    return images, targets.gpu() if plan.decoder == "mixed" else targets


class DaliLoader:
    """Iterable of Batch(images, targets) from DALI, `plan.batches` per pass.

    images: float32 (N, 3, size, size), normalised; targets: int64 (N,); both on the pipeline's
    device (cuda:device_id, or the CPU for DALI's CPU backend), so Lightning's transfer is a no-op.
    No bad files: DALI cannot skip a corrupt file (its decoder stops the pipeline, without naming
    the file), so a bad file ends the run with a UserError instead (find such files with
    `python -m vitrain.data.check DATA_ROOT`).

    Each pass builds a fresh pipeline, shuffled with seed + epoch (the trainer's epoch when there
    is one, so a resumed run continues the sequence; else the pass count), because a DALI iterator
    cannot restart mid-epoch and Lightning stops passes early (sanity check, limit_*_batches).
    """

    def __init__(self, plan: DaliPlan, epoch: Callable[[], int] | None = None) -> None:
        require_dali()
        self.plan = plan
        self.batches = plan.batches
        if self.batches == 0:
            raise UserError(
                f"{plan.split_dir} has {len(plan.files)} images, fewer than one batch of "
                f"{plan.batch_size} per device over {plan.num_shards} devices: lower "
                "data.batch_size."
            )
        self.epoch = epoch
        self.passes = 0
        self._running: Iterator | None = None

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[Batch]:
        if self._running is not None:
            self._running.close()  # frees the previous pass's pipeline before the next one
        self._running = self._pass(self.epoch() if self.epoch else self.passes)
        self.passes += 1
        return self._running

    def build(self, number: int):
        """DALI's iterator over a new pipeline for pass `number` (it reads its first batch now)."""
        from nvidia.dali import pipeline_def
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        plan = self.plan
        body = _train_pipeline if plan.split == "train" else _val_pipeline
        # enable_conditionals: RandAugment's choice of ops.
        pipeline = pipeline_def(body, enable_conditionals=True)(
            plan,
            plan.seed + number,
            batch_size=plan.batch_size,
            num_threads=plan.threads,
            device_id=plan.device_id,
            seed=plan.seed + number + _RANK_SEED_STRIDE * (plan.shard_id + 1),
        )
        # train: the pass stops after `batches` full batches; val: the last batch holds just
        # the shard's remaining files (DALI drops its padding).
        return DALIGenericIterator(
            [pipeline],
            ["images", "targets"],
            reader_name=READER,
            last_batch_policy=LastBatchPolicy.PARTIAL,
        )

    def _pass(self, number: int) -> Iterator[Batch]:
        iterator = None
        try:
            iterator = self.build(number)
            for _ in range(self.batches):
                outputs = next(iterator)[0]
                yield Batch(outputs["images"], outputs["targets"].reshape(-1).long())
        except RuntimeError as err:  # DALI's pipeline errors
            split_dir = self.plan.split_dir
            raise UserError(
                f"DALI stopped reading {split_dir}: {str(err).strip().splitlines()[-1]}. "
                "Usually an unreadable image (DALI cannot skip one): list them with "
                f"`python -m vitrain.data.check {split_dir.parent}`, remove them, or use "
                "data=imagenet (which skips them)."
            ) from None
        finally:
            del iterator  # the pipeline's threads and buffers go with it


class DaliDataModule(ImageDataModule):
    """data=imagenet_dali: the ImageFolder layout through DALI, sharded over the DDP ranks.

    device: where DALI decodes (auto: the GPU when training runs on one); threads: DALI's CPU
    threads per device (auto: data.num_workers' value); seed: the epoch order (the same on every
    rank, so the shards stay disjoint) and the augmentations.
    """

    def __init__(
        self,
        *,
        device: str = "auto",
        threads: int | str = "auto",
        seed: int = 0,
        repeated_aug: int = 1,
        **facts,
    ) -> None:
        super().__init__(**facts)
        self.device, self.threads, self.seed = device, threads, seed
        self.repeated_aug = repeated_aug  # a recipe may set it (recipe=deit3); check() refuses it

    def check(self, stage: str = "fit") -> None:
        """Fail before training (train.py calls this; Hydra would wrap errors raised in
        __init__), naming the value and the fix: DALI missing, settings DALI cannot honour, a
        wrong folder layout."""
        require_dali()
        if self.device not in DEVICES:
            raise UserError(f"data.device={self.device} is not one of {', '.join(DEVICES)}.")
        if self.augment.get("auto_augment"):
            rand_augment_kwargs(self.augment["auto_augment"])  # a bad string fails now
        check_augment(self.augment, "dali")
        if self.repeated_aug != 1:
            raise UserError(
                f"data.repeated_aug={self.repeated_aug}: DALI's reader has no repeated "
                "augmentation here; use data=imagenet or data=imagenet_shards (the same folder, "
                "or its shards), or data.repeated_aug=1."
            )
        if self.resolution.varies or self.resolution.batch_size_schedule != "constant":
            raise UserError(
                "data=imagenet_dali trains at one size: data.resolution_schedule and "
                "data.batch_size_schedule need data=imagenet or data=imagenet_shards "
                "(data.train_image_size works)."
            )
        super().check(stage)

    @property
    def dali_threads(self) -> int:
        """data.threads, or data.num_workers' value (auto: the CPUs per device)."""
        if self.threads == "auto":
            return max(self.workers, 1)
        threads = int(self.threads)
        if threads < 1:
            raise UserError(f"data.threads={self.threads} must be a positive number or auto.")
        return threads

    def plan(self, split: str) -> DaliPlan:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        device = training_device(trainer)
        # DALI writes its batches straight into this rank's device: Lightning's transfer is a no-op.
        if resolve_device(self.device, device.type == "cuda") == "gpu":
            decoder, device_id = "mixed", device.index
        else:
            decoder, device_id = "cpu", None
        listing = self.listing(split)
        samples = listing.samples
        if split == "val" and len(samples) % world:
            # Equal shards, so every rank runs the same batches and none gets an empty last one:
            # the first few files once more (fewer than the world size), as DistributedSampler.
            samples = samples + samples[: world - len(samples) % world]
        files, labels = zip(*samples, strict=True)
        return DaliPlan(
            split,
            listing.split_dir,
            files,
            labels,
            self.per_device_batch_size,
            self.dali_threads,
            decoder,
            device_id,
            shard_id=rank,
            num_shards=world,
            seed=self.seed,
            image_size=self.resolution.size(0) if split == "train" else self.image_size,
            augment=self.augment,
            eval_crop_pct=self.eval_crop_pct,
            mean=self.mean,
            std=self.std,
        )

    def _loader(self, split: str) -> DaliLoader:
        epoch = (lambda: self.trainer.current_epoch) if self.trainer else None
        return DaliLoader(self.plan(split), epoch)

    def train_dataloader(self) -> DaliLoader:
        return self._loader("train")

    def val_dataloader(self) -> DaliLoader:
        return self._loader("val")
