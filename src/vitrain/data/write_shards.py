"""Convert an ImageFolder into webdataset tar shards: `python -m vitrain.data.write_shards SRC DST`.

SRC/train/<class>/* and SRC/val/<class>/* become DST/train/train-000000.tar ... and DST/val/...,
each split with an index.json beside its shards: the class names, the shard names and the number of
samples in each. The reader (vitrain.data.shards) plans every epoch from those counts, so that
each DDP rank gets exactly the same number of samples without reading anything first.

Each sample is two tar members, `<class>/<stem>.<ext>` (the original file's bytes: no
re-encoding) and `<class>/<stem>.cls` (the class index as text), so any tar tool, webdataset or
DALI's webdataset reader can read the shards too. The sample order is shuffled once, with a fixed
seed, before sharding: ImageFolder order is sorted by class, and a shard-order shuffle plus a
sample buffer cannot mix classes that sit in different shards.

Shards are written to a local DST; copy them to object storage afterwards, e.g.
`aws s3 sync DST s3://bucket/imagenet-shards` or `gcloud storage rsync -r DST gs://bucket/...`.
"""

import argparse
import json
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import webdataset as wds

from vitrain.data.layout import SPLITS, check_same_classes, list_split
from vitrain.data.shards import INDEX_FORMAT, INDEX_NAME
from vitrain.errors import UserError

# ImageNet JPEGs average ~110 kB: 1000 per shard is ~110 MB, inside webdataset's advice of
# shards of 100 MB to 1 GB (few enough files for object storage, many enough to shuffle).
DEFAULT_SHARD_SIZE = 1000


def sample_key(path: str, class_name: str) -> str:
    """`<class>/<stem>`: webdataset splits a member name at the first dot of its base name."""
    return f"{class_name}/{Path(path).stem.replace('.', '_')}"


def shuffled_split(split_dir: Path, seed: int) -> tuple[list[str], list[tuple[str, int]]]:
    """The split's class names and its (path, class index) samples in a seeded random order."""
    listing = list_split(split_dir)
    samples = list(listing.samples)
    random.Random(seed).shuffle(samples)
    return listing.classes, samples


def write_split(
    split_dir: Path, out_dir: Path, split: str, shard_size: int, seed: int, read_threads: int = 8
) -> dict:
    """Write one split's shards and, last (so that a cut-short conversion has none), its index."""
    classes, samples = shuffled_split(split_dir, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    seen: set[str] = set()
    # Reading files is I/O-bound (network file systems especially): threads read ahead.
    with ThreadPoolExecutor(read_threads) as pool:
        for start in range(0, len(samples), shard_size):
            chunk = samples[start : start + shard_size]
            name = f"{split}-{len(shards):06d}.tar"
            with wds.TarWriter(str(out_dir / name), encoder=False) as writer:
                for (path, target), data in zip(
                    chunk, pool.map(lambda s: Path(s[0]).read_bytes(), chunk), strict=True
                ):
                    key = sample_key(path, classes[target])
                    if key in seen:
                        raise UserError(
                            f"{path}: two files of class {classes[target]} map to the sample "
                            f"name {key}: rename one of them."
                        )
                    seen.add(key)
                    suffix = Path(path).suffix.lower().lstrip(".")
                    writer.write({"__key__": key, suffix: data, "cls": str(target).encode()})
            shards.append({"name": name, "num_samples": len(chunk)})
    index = {
        "format": INDEX_FORMAT,
        "split": split,
        "classes": classes,
        "num_samples": len(samples),
        "shards": shards,
    }
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")
    return index


def convert(src: Path, dst: Path, shard_size: int = DEFAULT_SHARD_SIZE, seed: int = 0) -> dict:
    """SRC/{train,val} -> DST/{train,val}; returns {split: index}."""
    if shard_size < 1:
        raise UserError(f"--shard-size={shard_size} must be a positive number of samples.")
    check_same_classes({split: list_split(src / split).classes for split in SPLITS}, str(src))
    indexes = {}
    for split in SPLITS:
        indexes[split] = write_split(src / split, dst / split, split, shard_size, seed)
    return indexes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vitrain.data.write_shards",
        description="Convert an ImageFolder (SRC/train, SRC/val) into webdataset tar shards.",
    )
    parser.add_argument("src", type=Path, help="ImageFolder root with train/ and val/")
    parser.add_argument("dst", type=Path, help="output folder (local; sync it to s3/gs after)")
    parser.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        help=f"samples per shard (default {DEFAULT_SHARD_SIZE}, ~110 MB of ImageNet JPEGs)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the one-off sample shuffle")
    args = parser.parse_args(argv)
    try:
        indexes = convert(args.src, args.dst, args.shard_size, args.seed)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, index in indexes.items():
        print(
            f"{split}: {index['num_samples']} samples, {len(index['classes'])} classes, "
            f"{len(index['shards'])} shards in {args.dst / split}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
