"""Training input pipelines, images/s and images/s per worker, on the same JPEG files.

Makes (once, then reuses) a folder ROOT/train/<class>/*.JPEG of ImageNet-like JPEG files:
500x375, quality 90, photo-like content that compresses like a photo (about 70 KB each: a smooth
random colour field, random ellipses and rectangles, a slight blur, then grain at two scales), and
times the training DataLoader of each pipeline with the same workers, batch and DataLoader settings:

  baseline      torchvision ImageFolder + PIL + RandomResizedCrop(224) + flip + ToTensor + Normalize
  pil           vitrain's data.loader=pil: timm's create_transform on PIL (bicubic), no RandAugment
  pil+randaug   vitrain's data.loader=pil, the data=imagenet recipe (RandAugment, random erasing)
  fast          vitrain's data.loader=fast (decode.py), RandomResizedCrop + flip, no RandAugment
  fast+randaug  vitrain's data.loader=fast with the data=imagenet recipe (the default)
  shards        data=imagenet_shards: the same files in webdataset tar shards, data.loader=fast
  dali          data=imagenet_dali (when nvidia-dali is installed): DALI's GPU decoder where there
                is a GPU, its CPU backend otherwise, with --workers threads
  dali+randaug  the same with DALI's RandAugment and random erasing

The time of a batch counts until it is on the device and normalised: for `fast` that includes
DeviceNormalize (and random erasing), on the GPU where there is one, else in this process. Each
measurement starts fresh workers, skips --warmup batches, then times --batches batches; pipelines
run in alternating order (a b c ... c b a) for --repeats rounds and the table gives the medians.

    python bench/loader.py                        # 2,000 images, 100 classes, 1 and 2 workers
    python bench/loader.py --workers 8 --batch 256 --images 20000 --classes 1000
    python bench/loader.py --root /data/imagenet  # an existing ImageFolder (uses ROOT/train)

PIPELINES maps a name to a function (root, args) -> (DataLoader, finish): a new row is one entry.
"""

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_header  # noqa: E402

from vitrain.data.decode import DeviceNormalize, DeviceRandomErasing, sample_transform  # noqa: E402
from vitrain.data.images import RobustImageFolder  # noqa: E402
from vitrain.data.shard import DEFAULT_SHARD_SIZE, write_split  # noqa: E402
from vitrain.data.shards import ShardDataset, read_index  # noqa: E402
from vitrain.data.transforms import train_transform  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# conf/data/imagenet.yaml's augment; the plain rows drop RandAugment and random erasing.
RECIPE = {
    "scale": (0.08, 1.0),
    "ratio": (0.75, 4 / 3),
    "hflip": 0.5,
    "auto_augment": "rand-m9-mstd0.5-inc1",
    "re_prob": 0.25,
    "interpolation": "bicubic",
}
PLAIN = {**RECIPE, "auto_augment": None, "re_prob": 0.0}
WIDTH, HEIGHT, QUALITY = 500, 375, 90


# --- the images ----------------------------------------------------------------------------
def photo_like(rng: np.random.Generator) -> Image.Image:
    """Smooth colour field + shapes + blur + grain: entropy close to a photo's at quality 90."""
    field = (rng.random((6, 8, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(field).resize((WIDTH, HEIGHT), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(4, 12)):
        x0, y0 = int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT))
        box = (x0, y0, x0 + int(rng.integers(20, 250)), y0 + int(rng.integers(20, 200)))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5))).astype(np.int16)
    coarse = rng.integers(0, 256, (HEIGHT // 2, WIDTH // 2), dtype=np.uint8)
    coarse = np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.BILINEAR))
    pixels += (coarse.astype(np.int16)[..., None] - 128) // 3
    pixels += rng.integers(-8, 9, pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_folder(root: Path, images: int, classes: int, seed: int = 0) -> Path:
    """root/train/<class>/*.JPEG, written once: a marker names what is there."""
    marker = root / f".complete-{images}x{classes}-{WIDTH}x{HEIGHT}-q{QUALITY}"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = root / "train" / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        photo_like(rng).save(folder / f"{i:07d}.JPEG", quality=QUALITY)
    marker.touch()
    return root


def folder_summary(train_dir: Path) -> str:
    files = sorted(train_dir.rglob("*.JPEG")) or sorted(
        p for p in train_dir.rglob("*") if p.is_file()
    )
    sizes = [p.stat().st_size for p in files]
    with Image.open(files[0]) as first:
        shape = f"{first.size[0]}x{first.size[1]}"
    return (
        f"data: {train_dir} | {len(files)} files, e.g. {shape} | mean {np.mean(sizes) / 1e3:.0f} KB"
    )


# --- the pipelines -------------------------------------------------------------------------
Finish = Callable[[torch.Tensor, torch.device], torch.Tensor]


def _to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images.to(device, non_blocking=True)


def _loader(dataset, args) -> DataLoader:
    """The same DataLoader settings as vitrain's ImageFolderDataModule, for every pipeline."""
    return DataLoader(
        dataset,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.current_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if args.current_workers > 0 else None,
    )


def baseline(root: Path, args) -> tuple[DataLoader, Finish]:
    transform = T.Compose(
        [
            T.RandomResizedCrop(args.image_size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )
    return _loader(torchvision.datasets.ImageFolder(root / "train", transform), args), _to_device


def vitrain_pil(augment: dict):
    def build(root: Path, args) -> tuple[DataLoader, Finish]:
        transform = train_transform(args.image_size, augment, MEAN, STD)
        return _loader(RobustImageFolder(root / "train", transform), args), _to_device

    return build


def vitrain_fast_finish(augment: dict) -> Finish:
    """uint8 batch -> the device, normalised (and erased) there: DeviceNormalize."""
    normalize = DeviceNormalize(MEAN, STD, augment["re_prob"])

    def finish(images: torch.Tensor, device: torch.device) -> torch.Tensor:
        return normalize(images.to(device, non_blocking=True), training=True)

    return finish


def vitrain_fast(augment: dict):
    def build(root: Path, args) -> tuple[DataLoader, Finish]:
        decode = sample_transform("train", args.image_size, augment, 0.875, "bicubic", mean=MEAN)
        dataset = RobustImageFolder(root / "train", None, loader=decode)
        return _loader(dataset, args), vitrain_fast_finish(augment)

    return build


def vitrain_shards(augment: dict):
    """data=imagenet_shards: the same files as webdataset tar shards (made once, ROOT/shards)."""

    def build(root: Path, args) -> tuple[DataLoader, Finish]:
        shards = root / "shards" / "train"
        if not (shards / "index.json").is_file():
            write_split(root / "train", shards, "train", DEFAULT_SHARD_SIZE, seed=0)
        decode = sample_transform("train", args.image_size, augment, 0.875, "bicubic", mean=MEAN)
        dataset = ShardDataset(str(shards), read_index(str(shards)), decode, shuffle=True)
        dataset.configure(rank=0, world_size=1, batch_size=args.batch, drop_last=True)
        loader = DataLoader(
            dataset,
            batch_size=args.batch,
            num_workers=args.current_workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if args.current_workers > 0 else None,
        )
        return loader, vitrain_fast_finish(augment)

    return build


def vitrain_dali(augment: dict):
    """data=imagenet_dali: DALI decodes (nvJPEG on a GPU, its CPU backend here) with as many
    threads as the other pipelines have workers; normalised in DALI, erased on the device."""

    def build(root: Path, args) -> tuple[DataLoader, Finish]:
        from vitrain.data.dali import dali_train_loader

        loader = dali_train_loader(
            root, args.batch, max(args.current_workers, 1), args.image_size, augment, MEAN, STD
        )
        erase = DeviceRandomErasing(augment["re_prob"])

        def finish(images: torch.Tensor, device: torch.device) -> torch.Tensor:
            return erase(images.to(device, non_blocking=True))  # .to: DALI put them there

        return loader, finish

    return build


PIPELINES: dict[str, Callable[[Path, argparse.Namespace], tuple[DataLoader, Finish]]] = {
    "baseline": baseline,
    "pil": vitrain_pil(PLAIN),
    "pil+randaug": vitrain_pil(RECIPE),
    "fast": vitrain_fast(PLAIN),
    "fast+randaug": vitrain_fast(RECIPE),
    "shards": vitrain_shards(PLAIN),
}
if importlib.util.find_spec("nvidia") and importlib.util.find_spec("nvidia.dali"):
    PIPELINES |= {"dali": vitrain_dali(PLAIN), "dali+randaug": vitrain_dali(RECIPE)}
else:
    DALI_MISSING = "dali rows: not measured, nvidia-dali is not installed (pip install -e .[dali])"


# --- timing --------------------------------------------------------------------------------
def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def batches_forever(loader: DataLoader):
    while True:
        yield from loader


def images_per_s(name: str, root: Path, args, device: torch.device) -> float:
    """Fresh workers, --warmup batches skipped, then --batches timed to the device."""
    loader, finish = PIPELINES[name](root, args)
    batches = batches_forever(loader)
    for _ in range(args.warmup):
        finish(next(batches)[0], device)
    start = sync(device)
    for _ in range(args.batches):
        images = finish(next(batches)[0], device)
    elapsed = sync(device) - start
    if images.dtype != torch.float32 or images.shape[-1] != args.image_size:
        raise RuntimeError(f"{name} gave {images.dtype} {tuple(images.shape)}")
    del batches, loader  # ends the workers before the next pipeline starts its own
    return args.batches * args.batch / elapsed


def measure(root: Path, args, device: torch.device) -> list[dict]:
    rows = []
    for workers in args.workers:
        args.current_workers = workers
        runs: dict[str, list[float]] = {name: [] for name in args.pipelines}
        for round_ in range(args.repeats):
            order = args.pipelines if round_ % 2 == 0 else args.pipelines[::-1]
            for name in order:
                runs[name].append(images_per_s(name, root, args, device))
        base = statistics.median(runs["baseline"]) if "baseline" in runs else None
        for name in args.pipelines:
            rate = statistics.median(runs[name])
            per_worker = rate / max(workers, 1)
            rows.append(
                {
                    "pipeline": name,
                    "workers": workers,
                    "images_per_s": rate,
                    "per_worker": per_worker,
                    "ms_per_image_worker": 1000 / per_worker,
                    "ratio": rate / base if base else float("nan"),
                    "runs": runs[name],
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| pipeline | workers | images/s | images/s per worker | ms/image per worker "
        "| ratio to baseline |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['pipeline']} | {r['workers']} | {r['images_per_s']:.0f} | {r['per_worker']:.0f} "
            f"| {r['ms_per_image_worker']:.2f} | {r['ratio']:.2f}x |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="JPEG files to make")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="where the JPEG files are made, or an ImageFolder to reuse (ROOT/train); "
        "default: under the temp dir",
    )
    parser.add_argument("--workers", default="1,2", help="DataLoader workers, a comma list")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=3, help="batches skipped per measurement")
    parser.add_argument("--batches", type=int, default=20, help="batches timed per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds (median)")
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    args = parser.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")]
    args.pipelines = args.pipelines.split(",")
    unknown = [p for p in args.pipelines if p not in PIPELINES]
    if unknown:
        parser.error(f"unknown pipeline(s) {unknown}: choose from {', '.join(PIPELINES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the main process only collects batches: keep the cores for workers
    root = (
        args.root
        or Path(tempfile.gettempdir()) / f"vitrain-bench-loader-{args.images}x{args.classes}"
    )
    if not (root / "train").is_dir() or any(root.glob(".complete-*")):
        print(f"making (or reusing) {args.images} JPEG files in {root} ...", file=sys.stderr)
        make_folder(root, args.images, args.classes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(machine_header())
    print(folder_summary(root / "train"))
    print(
        f"batch {args.batch}, image size {args.image_size}, {args.warmup} warm-up + {args.batches} "
        f"timed batches, median of {args.repeats} alternating rounds, finished on {device}, "
        f"torchvision {torchvision.__version__}, pillow {Image.__version__}"
    )
    print(table(measure(root, args, device)))
    if "dali" not in PIPELINES:
        print(DALI_MISSING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
