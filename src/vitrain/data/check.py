"""`python -m vitrain.data.check ROOT`: list the files a training run could not decode.

Decodes every image file of ROOT's splits (ROOT/train, ROOT/val; or ROOT itself when it holds the
class folders), listed as training lists them (vitrain.data.layout), with the pil path's decoder,
in parallel, before a long run rather than at epoch 57. Exit code 1 when any file is bad, 0 when
all are good, 2 when ROOT is not an ImageFolder.
"""

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from vitrain.data.bad_samples import IMAGE_ERRORS
from vitrain.data.decode_pil import load_rgb
from vitrain.data.layout import SPLITS, list_split
from vitrain.errors import UserError


def check_file(path: str) -> str | None:
    """None for a good image, else the reason it cannot be read."""
    try:
        load_rgb(path)
    except IMAGE_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    return None


def image_files(root: Path) -> list[str]:
    """The files training would read: those of ROOT's splits, or of ROOT as one split."""
    splits = [root / split for split in SPLITS if (root / split).is_dir()] or [root]
    return [path for split_dir in splits for path in list_split(split_dir).files]


def find_bad_files(root: Path, workers: int) -> tuple[int, list[tuple[str, str]]]:
    files = image_files(root)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(check_file, files, chunksize=256))
    return len(files), [(f, r) for f, r in zip(files, reasons, strict=True) if r]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitrain.data.check", description=__doc__)
    parser.add_argument("root", type=Path, help="dataset folder, e.g. /data/imagenet")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: {args.root} is not a directory", file=sys.stderr)
        return 2
    try:
        total, bad = find_bad_files(args.root, args.workers)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path, reason in bad:
        print(f"{path}\t{reason}")
    print(f"{total} image files checked under {args.root}: {len(bad)} bad", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
