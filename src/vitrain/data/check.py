"""`python -m vitrain.data.check ROOT`: what a training run would get wrong or could not read.

Lists ROOT's splits (ROOT/train, ROOT/val; or ROOT itself when it holds the class folders) as
training lists them (vitrain.data.layout: a symlink loop or a folder reached twice is an error,
folders are never images) and checks that the splits have the same class folders; then decodes
every image file with the pil path's decoder, in parallel, before a long run rather than at
epoch 57, and names the files whose pixels are converted (16-bit grey, scaled to 8 bits).

Prints one line per bad file (path, tab, reason) on stdout; layout errors as `error:` lines and
a summary on stderr. Exit code 2 when the layout is wrong (or ROOT is not an ImageFolder), 1
when any file is bad, 0 when all is well.
"""

import argparse
import io
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from vitrain.data.bad_samples import IMAGE_ERRORS
from vitrain.data.decode_pil import SIXTEEN_BIT_MODES, read_encoded, to_rgb
from vitrain.data.layout import SPLITS, check_same_classes, list_split
from vitrain.errors import UserError


def check_file(path: str) -> tuple[str | None, str | None]:
    """(reason the file cannot be read or None, its pixel mode when it is converted or None)."""
    try:
        with Image.open(io.BytesIO(read_encoded(path))) as image:
            image.load()
            to_rgb(image)
            converted = image.mode if image.mode in SIXTEEN_BIT_MODES else None
    except IMAGE_ERRORS as err:
        return f"{type(err).__name__}: {err}", None
    return None, converted


def list_splits(root: Path) -> tuple[list[str], list[str]]:
    """(the image files training would read, the layout errors found)."""
    split_dirs = [root / split for split in SPLITS if (root / split).is_dir()] or [root]
    files, errors, classes = [], [], {}
    for split_dir in split_dirs:
        try:
            listing = list_split(split_dir)
        except UserError as err:
            errors.append(str(err))
            continue
        files += listing.files
        classes[split_dir.name] = listing.classes
    if set(classes) == set(SPLITS):
        try:
            check_same_classes(classes, str(root))
        except UserError as err:
            errors.append(str(err))
    return files, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitrain.data.check", description=__doc__)
    parser.add_argument("root", type=Path, help="dataset folder, e.g. /data/imagenet")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: {args.root} is not a directory", file=sys.stderr)
        return 2
    files, errors = list_splits(args.root)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(check_file, files, chunksize=256))
    bad = [(path, reason) for path, (reason, _) in zip(files, results, strict=True) if reason]
    converted = [(path, mode) for path, (_, mode) in zip(files, results, strict=True) if mode]
    for path, reason in bad:
        print(f"{path}\t{reason}")
    for path, mode in converted:
        print(f"note: {path} has 16-bit pixels ({mode}): read scaled to 8 bits", file=sys.stderr)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    print(
        f"{len(files)} image files checked under {args.root}: {len(bad)} bad, "
        f"{len(converted)} converted, {len(errors)} layout errors",
        file=sys.stderr,
    )
    return 2 if errors else 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
