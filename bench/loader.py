"""Training input pipelines, images/s and images/s per worker, on the same JPEG files.

Makes (once, then reuses) a folder ROOT/train/<class>/*.JPEG of ImageNet-like JPEG files:
500x375, quality 90, photo-like content that compresses like a photo (about 70 KB each: a smooth
random colour field, random ellipses and rectangles, a slight blur, then grain at two scales), and
times the training DataLoader of each pipeline with the same workers, batch and DataLoader settings:

  baseline      torchvision ImageFolder + PIL + RandomResizedCrop(224) + flip + ToTensor + Normalize
  pil           data=imagenet data.loader=pil: timm's create_transform on PIL, no RandAugment
  pil+randaug   data=imagenet data.loader=pil with data=imagenet's recipe (RandAugment, erasing)
  fast          data=imagenet (data.loader=fast), RandomResizedCrop + flip, no RandAugment
  fast+randaug  data=imagenet as it trains by default (RandAugment, random erasing)
  pil+3aug, fast+3aug  recipe=deit3's augmentations: 3-Augment + colour jitter 0.3 (timm's 3a
                policy on PIL for pil; batched on the device for fast), no random erasing
  shards        data=imagenet_shards: the same files in webdataset tar shards, data.loader=fast
  dali          data=imagenet_dali (when nvidia-dali is installed): DALI's GPU decoder where there
                is a GPU, its CPU backend otherwise, with --workers threads
  dali+randaug  the same with DALI's RandAugment and random erasing

Every vitrain row is the training loader `python train.py data=... <overrides>` builds: the config
is composed from conf/ with the row's overrides (PIPELINES), the datamodule is vitrain.train's
build_datamodule, and each batch goes through the datamodule's own device step (prepare_batch:
normalisation of uint8 batches and random erasing, on the GPU where there is one, else here).
The time of a batch counts until it is on the device and prepared. Each measurement starts fresh
workers, skips --warmup batches, then times --batches batches; then --batches more from the
loader alone (what the workers deliver per second: the pipeline's rate wherever the device step
keeps up, as on a GPU) and the device step alone on one batch (ms per image: on a CPU-only
machine the main process does it, on the cores the workers also need). Pipelines run in
alternating order (a b c ... c b a) for --repeats rounds and the table gives the medians.

    python bench/loader.py                        # 2,000 images, 100 classes, 1 and 2 workers
    python bench/loader.py --workers 8 --batch 256 --images 20000 --classes 1000
    python bench/loader.py --root /data/imagenet  # an existing ImageFolder (uses ROOT/train)

PIPELINES maps a name to the Hydra overrides of its row: a new row is one entry.
"""

import argparse
import importlib.util
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from lightning.pytorch.utilities import move_data_to_device
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from common import compose_config, machine_header  # noqa: E402

from vitrain.data.write_shards import convert  # noqa: E402
from vitrain.runtime import training_device  # noqa: E402
from vitrain.train import build_datamodule  # noqa: E402

WIDTH, HEIGHT, QUALITY = 500, 375, 90
PREFETCH = 4  # batches per worker, as vitrain's DataLoaders prefetch
# Every vitrain row starts from data=imagenet's recipe; the plain rows drop RandAugment and erasing.
PLAIN = ["data.augment.auto_augment=null", "data.augment.re_prob=0"]
# recipe=deit3's augmentations: 3-Augment and colour jitter 0.3, no random erasing.
THREE_AUGMENT = [
    "data.augment.auto_augment=3a",
    "data.augment.color_jitter=0.3",
    "data.augment.re_prob=0",
]
PIPELINES: dict[str, list[str]] = {
    "pil": ["data=imagenet", "data.loader=pil", *PLAIN],
    "pil+randaug": ["data=imagenet", "data.loader=pil"],
    "pil+3aug": ["data=imagenet", "data.loader=pil", *THREE_AUGMENT],
    "fast": ["data=imagenet", *PLAIN],
    "fast+randaug": ["data=imagenet"],
    "fast+3aug": ["data=imagenet", *THREE_AUGMENT],
    "shards": ["data=imagenet_shards", *PLAIN],
}
if importlib.util.find_spec("nvidia") and importlib.util.find_spec("nvidia.dali"):
    PIPELINES |= {"dali": ["data=imagenet_dali", *PLAIN], "dali+randaug": ["data=imagenet_dali"]}
else:
    DALI_MISSING = "dali rows: not measured, nvidia-dali is not installed (pip install -e .[dali])"
ROWS = ["baseline", *PIPELINES]


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


def write_image(task: tuple[Path, int, int, int]) -> None:
    """One file: image i of the folder, from its own seed (the same file whoever writes it)."""
    root, i, images, classes = task
    split = "train" if i < images else "val"
    folder = root / split / f"n{i % classes:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    photo_like(np.random.default_rng([0, i])).save(folder / f"{i:07d}.JPEG", quality=QUALITY)


def make_folder(root: Path, images: int, classes: int, jobs: int = 1) -> Path:
    """root/train/<class>/*.JPEG (and one val image per class, which a datamodule's layout check
    wants), written once by `jobs` processes: a marker names what is there."""
    marker = root / f".complete-{images}x{classes}-{WIDTH}x{HEIGHT}-q{QUALITY}-with-val-v2"
    if marker.exists():
        return root
    tasks = [(root, i, images, classes) for i in range(images + classes)]
    with multiprocessing.Pool(max(jobs, 1)) as pool:
        pool.map(write_image, tasks, chunksize=64)
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
Prepare = Callable[[object, torch.device], torch.Tensor]  # a loader's batch -> images on device


def baseline(root: Path, args) -> tuple[Iterable, Prepare]:
    """The issue's reference: torchvision's ImageFolder and transforms, DataLoader settings as
    vitrain's (the same workers, batch, pinning and prefetch)."""
    transform = T.Compose(
        [T.RandomResizedCrop(args.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
         T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    )  # fmt: skip
    workers = args.current_workers
    loader = DataLoader(
        torchvision.datasets.ImageFolder(root / "train", transform),
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=PREFETCH if workers > 0 else None,
    )
    return loader, lambda batch, device: batch[0].to(device, non_blocking=True)


def class_count(root: Path) -> int:
    return sum(1 for p in (root / "train").iterdir() if p.is_dir())


def shard_root(root: Path) -> Path:
    """The same files as tar shards (made once, ROOT/shards)."""
    shards = root / "shards"
    if not (shards / "val" / "index.json").is_file():
        convert(root, shards)
    return shards


def vitrain_pipeline(name: str, root: Path, args, out: Path) -> tuple[Iterable, Prepare]:
    """The training loader of `python train.py <the row's overrides>`, and its device step."""
    overrides = PIPELINES[name]
    data_root = shard_root(root) if "data=imagenet_shards" in overrides else root
    cfg = compose_config(
        [
            *overrides,
            f"data.root={data_root}",
            f"data.num_classes={class_count(root)}",
            f"data.image_size={args.image_size}",
            f"data.batch_size={args.batch}",  # one device: the global batch is the device's
            f"data.num_workers={args.current_workers}",
            *(["data.threads=" + str(max(args.current_workers, 1))] if "dali" in name else []),
        ],
        out,
    )
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")

    def prepare(batch, device: torch.device) -> torch.Tensor:
        on_device = move_data_to_device(batch, device)
        return datamodule.prepare_batch(on_device, training=True).images

    return datamodule.train_dataloader(), prepare


def build(name: str, root: Path, args) -> tuple[Iterable, Prepare]:
    if name == "baseline":
        return baseline(root, args)
    return vitrain_pipeline(name, root, args, Path(tempfile.mkdtemp(prefix="vitrain-loader-")))


# --- timing --------------------------------------------------------------------------------
def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def batches_forever(loader: DataLoader):
    while True:
        yield from loader


def images_per_s(name: str, root: Path, args, device: torch.device) -> dict[str, float]:
    """Fresh workers, --warmup batches skipped, then --batches timed to the device, prepared;
    then --batches more from the loader alone (what the workers deliver), and the device step
    alone on one batch (what the main process or the GPU adds)."""
    loader, prepare = build(name, root, args)
    batches = batches_forever(loader)
    queued = PREFETCH * max(args.current_workers, 1)  # batches the workers may hold ready
    for _ in range(args.warmup):
        prepare(next(batches), device)
    for _ in range(queued):  # drained by a fast consumer: the timing below sees the workers
        next(batches)
    start = time.perf_counter()
    for _ in range(args.batches):
        batch = next(batches)
    loader_alone = time.perf_counter() - start
    for _ in range(queued):  # the queue settles at the prepared pipeline's own pace
        prepare(next(batches), device)
    start = sync(device)
    for _ in range(args.batches):
        images = prepare(next(batches), device)
    elapsed = sync(device) - start
    if images.dtype != torch.float32 or images.shape[-1] != args.image_size:
        raise RuntimeError(f"{name} gave {images.dtype} {tuple(images.shape)}")
    start = sync(device)
    for _ in range(3):
        prepare(batch, device)
    device_step = (sync(device) - start) / 3
    del batches, loader  # ends the workers before the next pipeline starts its own
    images = args.batches * args.batch
    return {
        "prepared": images / elapsed,
        "loader_alone": images / loader_alone,
        "device_ms": 1000 * device_step / args.batch,
    }


def measure(root: Path, args, device: torch.device) -> list[dict]:
    rows = []
    for workers in args.workers:
        args.current_workers = workers
        runs: dict[str, list[dict]] = {name: [] for name in args.pipelines}
        for round_ in range(args.repeats):
            order = args.pipelines if round_ % 2 == 0 else args.pipelines[::-1]
            for name in order:
                runs[name].append(images_per_s(name, root, args, device))

        def median(name: str, key: str, runs=runs) -> float:
            return statistics.median(run[key] for run in runs[name])

        base = "baseline" in runs
        for name in args.pipelines:
            rate, alone = median(name, "prepared"), median(name, "loader_alone")
            per_worker = rate / max(workers, 1)
            rows.append(
                {
                    "pipeline": name,
                    "workers": workers,
                    "images_per_s": rate,
                    "per_worker": per_worker,
                    "ms_per_image_worker": 1000 / per_worker,
                    "ratio": rate / median("baseline", "prepared") if base else float("nan"),
                    "loader_alone": alone,
                    "loader_ratio": alone / median("baseline", "loader_alone")
                    if base
                    else float("nan"),
                    "device_ms": median(name, "device_ms"),
                    "runs": runs[name],
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| pipeline | workers | images/s | images/s per worker | ms/image per worker "
        "| ratio to baseline | loader alone: images/s | ratio | device step: ms/image |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['pipeline']} | {r['workers']} | {r['images_per_s']:.0f} | {r['per_worker']:.0f} "
            f"| {r['ms_per_image_worker']:.2f} | {r['ratio']:.2f}x | {r['loader_alone']:.0f} "
            f"| {r['loader_ratio']:.2f}x | {r['device_ms']:.2f} |"
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
    parser.add_argument("--pipelines", default=",".join(ROWS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="processes making files")
    parser.add_argument("--make-only", action="store_true", help="make the folder, measure nothing")
    args = parser.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")]
    args.pipelines = args.pipelines.split(",")
    unknown = [p for p in args.pipelines if p not in ROWS]
    if unknown:
        parser.error(f"unknown pipeline(s) {unknown}: choose from {', '.join(ROWS)}")
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
        make_folder(root, args.images, args.classes, args.jobs)
    if args.make_only:
        print(folder_summary(root / "train"))
        return 0
    device = training_device(None)
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
