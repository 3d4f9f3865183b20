"""data.loader=fast (vitrain.data.decode_fast) against the pil path and torchvision; the device
step; bench/loader.py."""

import io
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from conftest import ROOT, TINY, run_train
from lightning.pytorch import Callback
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from vitrain.data.bad_samples import IMAGE_ERRORS
from vitrain.data.batch import Batch
from vitrain.data.decode_fast import AugmentationError, FastSampleTransform
from vitrain.data.decode_pil import eval_transform, train_transform
from vitrain.data.imagefolder import ImageFolderDataModule
from vitrain.data.on_device import DeviceAugment, DeviceNormalize
from vitrain.errors import UserError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PLAIN = {
    "scale": [0.08, 1.0],
    "ratio": [0.75, 1.3333333],
    "hflip": 0.5,
    "auto_augment": None,
    "re_prob": 0.0,
    "interpolation": "bicubic",
}
RECIPE = {**PLAIN, "auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25}


def photo(width: int = 500, height: int = 375, seed: int = 0) -> Image.Image:
    """Smooth colours plus grain: a JPEG that decodes to something photo-like."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    pixels = np.asarray(field.resize((width, height), Image.BICUBIC)).astype(np.int16)
    pixels += rng.integers(-10, 11, pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def seed_all(seed: int) -> None:
    """The crop draws from python's random, the flip from torch's, RandAugment from numpy's too."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def encoded(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def pil_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


# --- the sample transform ------------------------------------------------------------------
@pytest.mark.parametrize("augment", [PLAIN, RECIPE], ids=["plain", "randaugment"])
@pytest.mark.parametrize("size", [224, 96])
def test_train_sample_is_uint8_chw_of_the_image_size(augment, size, tmp_path):
    data = encoded(photo(), quality=90)
    path = tmp_path / "a.JPEG"
    path.write_bytes(data)
    transform = FastSampleTransform("train", size, augment, 0.875, "bicubic")
    seed_all(0)
    from_bytes = transform(data)
    seed_all(0)
    from_path = transform(path)
    assert from_bytes.shape == (3, size, size) and from_bytes.dtype == torch.uint8
    assert from_bytes.is_contiguous()
    assert torch.equal(from_bytes, from_path)
    assert 0 <= int(from_bytes.min()) < int(from_bytes.max()) <= 255


def test_crop_parameters_are_the_pil_paths_for_the_same_seed():
    """The pil path's crop is timm's RandomResizedCropAndInterpolation (python's random)."""
    transform = FastSampleTransform("train", 224, PLAIN, 0.875, "bicubic")
    timm_crop = RandomResizedCropAndInterpolation(224, tuple(PLAIN["scale"]), tuple(PLAIN["ratio"]))
    image = Image.new("RGB", (500, 375))
    random.seed(7)
    ours = [transform.crop_box(375, 500) for _ in range(500)]
    random.seed(7)
    theirs = [timm_crop.get_params(image, timm_crop.scale, timm_crop.ratio) for _ in range(500)]
    assert ours == theirs


@pytest.mark.parametrize("height, width", [(375, 500), (500, 333), (64, 64)])
def test_crop_statistics_match_torchvisions_random_resized_crop(height, width):
    """Area fraction and aspect ratio: the same range and quantiles as torchvision's get_params."""
    draws = 4000
    transform = FastSampleTransform("train", 224, PLAIN, 0.875, "bicubic")
    random.seed(0)
    ours = np.array([transform.crop_box(height, width)[2:] for _ in range(draws)], dtype=float)
    torch.manual_seed(0)
    image = torch.empty(3, height, width)
    theirs = np.array(
        [
            RandomResizedCrop.get_params(image, PLAIN["scale"], PLAIN["ratio"])[2:]
            for _ in range(draws)
        ],
        dtype=float,
    )

    def area_and_log_ratio(boxes):
        return boxes[:, 0] * boxes[:, 1] / (height * width), np.log(boxes[:, 1] / boxes[:, 0])

    (our_area, our_ratio), (their_area, their_ratio) = map(area_and_log_ratio, (ours, theirs))
    quantiles = [0.05, 0.25, 0.5, 0.75, 0.95]
    np.testing.assert_allclose(
        np.quantile(our_area, quantiles), np.quantile(their_area, quantiles), atol=0.03
    )
    np.testing.assert_allclose(
        np.quantile(our_ratio, quantiles), np.quantile(their_ratio, quantiles), atol=0.03
    )
    # the ranges (pixel rounding allows a little beyond scale and ratio, in both)
    assert our_area.min() >= 0.07 and our_area.max() <= 1.0
    assert np.exp(our_ratio).min() >= 0.75 * 0.9 and np.exp(our_ratio).max() <= 4 / 3 * 1.1
    assert abs(our_area.min() - their_area.min()) < 0.01
    assert abs(our_area.max() - their_area.max()) < 0.01


def test_reduced_scale_decode_gives_the_full_decodes_crop():
    """A 1200x900 JPEG and a 600x800 crop: decoded at 1/2 scale, the 224 px result is within a
    level or two of cropping the full decode."""
    data = encoded(photo(1200, 900), quality=90)
    transform = FastSampleTransform("train", 224, {**PLAIN, "hflip": 0.0}, 0.875, "bicubic")
    transform.crop_box = lambda height, width: (100, 200, 600, 800)
    out = transform(data).float()
    full = F.pil_to_tensor(pil_rgb(data))
    reference = F.resized_crop(
        full, 100, 200, 600, 800, [224, 224], InterpolationMode.BICUBIC, antialias=True
    ).float()
    assert (out - reference).abs().mean() < 1.0
    assert (out - reference).abs().max() <= 4


def test_eval_equals_the_pil_paths_center_crop():
    data = encoded(photo(), quality=90)
    fast = FastSampleTransform("val", 224, PLAIN, 0.875, "bicubic")(data)
    assert fast.shape == (3, 224, 224) and fast.dtype == torch.uint8
    ours = DeviceNormalize(MEAN, STD)(fast[None])[0]
    theirs = eval_transform(224, 0.875, "bicubic", MEAN, STD)(pil_rgb(data))
    difference = (ours - theirs).abs()
    assert difference.mean() < 0.005 and difference.max() < 0.05  # 1 level is 0.017


@pytest.mark.parametrize(
    "data",
    [
        encoded(photo().convert("L"), quality=90),
        encoded(photo().convert("CMYK"), quality=90),
        encoded(photo(), "PNG"),
    ],
    ids=["grayscale-jpeg", "cmyk-jpeg", "png"],
)
def test_other_formats_give_the_same_rgb_as_pil(data):
    fast = FastSampleTransform("val", 224, PLAIN, 0.875, "bicubic")(data)
    ours = DeviceNormalize(MEAN, STD)(fast[None])[0]
    theirs = eval_transform(224, 0.875, "bicubic", MEAN, STD)(pil_rgb(data))
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert (ours - theirs).abs().mean() < 0.01


def test_a_jpeg_libjpeg_only_warns_about_is_read_as_pil_reads_it():
    """Extraneous bytes before a marker: simplejpeg's strict mode refuses it, PIL (the pil path,
    vitrain.data.check) reads it; so must the fast path, not count it as a bad file."""
    data = encoded(photo(), quality=90)
    start_of_scan = data.index(b"\xff\xda")
    damaged = data[:start_of_scan] + b"\x12\x34\x56" + data[start_of_scan:]
    fast = FastSampleTransform("val", 224, PLAIN, 0.875, "bicubic")(damaged)
    clean = FastSampleTransform("val", 224, PLAIN, 0.875, "bicubic")(data)
    assert torch.equal(fast, clean)


@pytest.mark.parametrize(
    "data",
    [encoded(photo(), quality=90)[:3000], b"", b"this is not an image\n"],
    ids=["truncated", "empty", "text"],
)
def test_unreadable_bytes_raise_what_robust_image_folder_catches(data):
    with pytest.raises(IMAGE_ERRORS):
        FastSampleTransform("train", 224, PLAIN, 0.875, "bicubic")(data)


def rand_augment_of(transform):
    if isinstance(transform, FastSampleTransform):
        return transform.rand_augment
    return next(t for t in transform.transforms if isinstance(t, RandAugment))


@pytest.mark.parametrize("path", ["fast", "pil"])
def test_posterize_to_zero_bits_gives_a_black_image_not_an_error(path):
    """rand-m9-mstd0.5-inc1 can ask PosterizeIncreasing for 0 bits; Pillow 13 raises for 0."""
    if path == "fast":
        transform = FastSampleTransform("train", 64, RECIPE, 0.875, "bicubic")
    else:
        transform = train_transform(64, RECIPE, MEAN, STD)
    ops = {op.name: op for op in rand_augment_of(transform).ops}
    image = photo(64, 64)
    black = ops["PosterizeIncreasing"].aug_fn(image, 0)
    assert black.size == image.size and black.mode == "RGB" and black.getextrema()[0] == (0, 0)
    kept = np.asarray(ops["PosterizeIncreasing"].aug_fn(image, 2))
    assert set(np.unique(kept)) <= {0, 64, 128, 192}


def test_a_failing_augmentation_is_an_error_not_a_bad_file():
    transform = FastSampleTransform("train", 64, RECIPE, 0.875, "bicubic")

    def broken(image):
        raise ValueError("a bug in an augmentation")

    transform.rand_augment = broken
    with pytest.raises(AugmentationError, match="a bug in an augmentation") as raised:
        transform(encoded(photo(), quality=90))
    assert not isinstance(raised.value, IMAGE_ERRORS)


# --- on the device -------------------------------------------------------------------------
def test_device_normalize_has_the_pil_paths_values_and_range():
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    pixels[0, :, 0, 0], pixels[0, :, 0, 1] = 0, 255
    ours = DeviceNormalize(MEAN, STD)(pixels)
    theirs = F.normalize(pixels.float() / 255.0, list(MEAN), list(STD))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    lowest = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    highest = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(ours.amin(dim=(0, 2, 3)), lowest)
    torch.testing.assert_close(ours.amax(dim=(0, 2, 3)), highest)


def test_random_erasing_only_on_training_batches():
    pixels = torch.full((8, 3, 64, 64), 128, dtype=torch.uint8)
    augment = DeviceAugment(MEAN, STD, {**PLAIN, "re_prob": 1.0})
    plain = DeviceNormalize(MEAN, STD)(pixels)
    torch.testing.assert_close(augment(pixels, training=False), plain)
    erased = augment(pixels, training=True)
    changed = (erased != plain).any(dim=1)  # (N, H, W): pixels some channel of which changed
    assert changed.flatten(1).any(dim=1).all()  # every image got a patch
    assert changed.float().mean() < 0.5  # a patch, not the whole image (scale 0.02-1/3)


def facts(root: Path, batch_size: int, image_size: int) -> dict:
    """A two-class dataset's facts, as conf/data/dataset/ gives them."""
    return dict(
        root=str(root),
        batch_size=batch_size,
        num_workers=0,
        image_size=image_size,
        num_classes=2,
        augment=PLAIN,
        eval_crop_pct=0.875,
        mean=MEAN,
        std=STD,
    )


def test_unknown_loader_is_a_user_error_naming_the_choices(tmp_path):
    kwargs = facts(tmp_path, 4, 32)
    with pytest.raises(UserError, match=r"data.loader=turbo is not one of fast, pil"):
        ImageFolderDataModule(**kwargs, loader="turbo")
    with pytest.raises(UserError, match=r"data=imagenet_dali"):
        ImageFolderDataModule(**kwargs, loader="dali")
    assert ImageFolderDataModule(**kwargs).loader == "fast"


@pytest.mark.parametrize("device, pinned", [("cpu", False), ("cuda", True)])
def test_batches_are_pinned_only_for_a_cuda_device(device, pinned, tmp_path):
    """data.pin_memory=true pins for a GPU; a CPU run gets pageable batches (and no warning)."""
    module = ImageFolderDataModule(**facts(jpeg_folder(tmp_path / "data"), 4, 32))

    class Strategy:
        root_device = torch.device(device)

    class Trainer:
        strategy = Strategy()
        world_size, global_rank, current_epoch = 1, 0, 0

    module.trainer = Trainer()
    module.setup("fit")
    assert module.pin_memory is True  # the setting, as configured
    assert module.train_dataloader().pin_memory is pinned
    assert module.val_dataloader().pin_memory is pinned


def test_fast_train_batches_have_the_pil_paths_shape_dtype_and_range(tmp_path):
    """Same folder, same settings: the batches the model sees (after the device hook)."""
    root = jpeg_folder(tmp_path / "data")
    batches = {}
    for loader in ("fast", "pil"):
        module = ImageFolderDataModule(**facts(root, 8, 64), pin_memory=False, loader=loader)
        module.setup("fit")
        batch = next(iter(module.train_dataloader()))
        assert isinstance(batch, Batch) and batch.bad_files == ()
        batch = module.on_after_batch_transfer(batch, 0)
        images, targets = batch.images, batch.targets
        batches[loader] = images
        assert images.shape == (8, 3, 64, 64) and images.dtype == torch.float32
        assert targets.dtype == torch.int64 and batch.bad_files == ()
    lowest = float(((0 - torch.tensor(MEAN)) / torch.tensor(STD)).min())
    highest = float(((1 - torch.tensor(MEAN)) / torch.tensor(STD)).max())
    for images in batches.values():
        assert lowest - 1e-4 <= images.min() and images.max() <= highest + 1e-4
    # the same recipe: the per-channel means of the two paths' batches are close
    means = {k: v.mean(dim=(0, 2, 3)) for k, v in batches.items()}
    assert (means["fast"] - means["pil"]).abs().max() < 0.5


# --- a whole fit ---------------------------------------------------------------------------
def jpeg_folder(root: Path, per_class: int = 8) -> Path:
    for split, count in (("train", per_class), ("val", per_class // 2)):
        for label in range(2):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = photo(120, 90, seed=label * 100 + i)
                image.save(folder / f"{i}.JPEG", quality=90)
    return root


class BatchProbe(Callback):
    """Records the dtype and range of the images the model gets."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.dtype, float, float, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        images = batch.images
        self.seen.append((images.dtype, float(images.min()), float(images.max()), images.shape[-1]))


@pytest.mark.parametrize("loader", ["fast", "pil"])
def test_fit_on_a_jpeg_folder(loader, tmp_path):
    root = jpeg_folder(tmp_path / "data")
    probe = BatchProbe()
    run_train(
        [
            *TINY,
            "data=imagenet",
            f"data.root={root}",
            f"data.loader={loader}",
            "data.num_classes=2",
            "data.image_size=32",
            "data.batch_size=4",
            "data.num_workers=1",
            "data.augment.re_prob=0.0",  # keeps the range exact; random erasing: tested above
            "trainer.max_epochs=1",
        ],
        tmp_path / "run",
        callbacks=[probe],
    )
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "val/acc1" in header and "train/loss" in header
    assert len(probe.seen) == 4  # 16 train images / batch 4
    lowest = float(((0 - torch.tensor(MEAN)) / torch.tensor(STD)).min())
    highest = float(((1 - torch.tensor(MEAN)) / torch.tensor(STD)).max())
    for dtype, low, high, size in probe.seen:
        assert dtype == torch.float32 and size == 32
        assert lowest - 1e-4 <= low < 0 < high <= highest + 1e-4


# --- the benchmark -------------------------------------------------------------------------
def test_bench_loader_prints_a_table_with_each_pipelines_ratio(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "loader.py"),
            "--images=24",
            "--classes=3",
            "--batch=4",
            "--warmup=1",
            "--batches=2",
            "--repeats=1",
            "--workers=1",
            f"--root={tmp_path / 'jpegs'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "torch " in lines[0]
    assert "24 files, e.g. 500x375" in result.stdout
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in lines
        if line.startswith("| ")
    }
    header = rows.pop("pipeline")
    assert header[-4:] == [
        "ratio to baseline",
        "loader alone: images/s",
        "ratio",
        "device step: ms/image",
    ]
    assert set(rows) >= {"baseline", "pil", "pil+randaug", "pil+3aug", "fast", "fast+randaug",
                         "fast+3aug"}  # fmt: skip
    assert rows["baseline"][4] == "1.00x" and rows["baseline"][6] == "1.00x"
    for name, cells in rows.items():
        if name != "---":
            assert float(cells[4].rstrip("x")) > 0 and float(cells[6].rstrip("x")) > 0
            assert float(cells[7]) >= 0  # the device step's ms per image
    assert len(list((tmp_path / "jpegs" / "train").rglob("*.JPEG"))) == 24
