"""The ImageFolder layout, listed once for every reader of it: root/<split>/<class>/<image files>.

The ImageFolder loader, DALI, the shard writer and `python -m vitrain.data.check` all list a
split here and check the splits against each other here, so that they agree on the classes,
their indices (sorted class-folder names, as torchvision's ImageFolder numbers them: checkpoints
move between data=imagenet, imagenet_dali and imagenet_shards) and which files are images.

The rules, each a way a folder trained silently wrong before:
- an image file is a non-directory entry with an image extension (a folder named x.JPEG is a
  folder: its images, like those of any subfolder, belong to the class);
- a folder is listed once: a directory symlink is followed, but one that leads back to a folder
  already listed (a loop: torchvision follows it 40 levels deep, one class then counts 41 times;
  or a second link to the same folder) is an error naming it;
- train/ and val/ have the same class folders (a val/ folder named otherwise gets another
  class's index, and is scored against the wrong labels), and data.num_classes is train/'s count;
  where the class names are given (data.classes: eval.py takes them from the checkpoint, whose
  run recorded train/'s), every split read has them instead, and train/ need not be there.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from vitrain.errors import UserError

SPLITS = ("train", "val")
# The splits each Lightning stage reads: training validates too; eval.py validates only.
STAGE_SPLITS = {"fit": SPLITS, "validate": ("val",)}
SHOWN = 10  # class names shown in a difference


@dataclass(frozen=True)
class Listing:
    """One split: its class names (index = position) and its (path, class index) samples."""

    split_dir: Path
    classes: list[str]
    samples: list[tuple[str, int]]

    @property
    def files(self) -> list[str]:
        return [path for path, _ in self.samples]

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]


def list_split(split_dir: Path) -> Listing:
    """Every image file of split_dir/<class>/... (subfolders included), in torchvision
    ImageFolder's order."""
    split_dir = Path(split_dir)
    expected = f"expected {split_dir}/<class>/<image files>"
    if split_dir.exists() and not split_dir.is_dir():
        raise UserError(f"{split_dir} is a file, not a folder: {expected}")
    if not split_dir.is_dir():
        raise UserError(f"{split_dir} does not exist: {expected}")
    try:
        with os.scandir(split_dir) as entries:
            classes = sorted(entry.name for entry in entries if entry.is_dir())
    except OSError as err:
        raise UserError(
            f"cannot read {split_dir} ({err.strerror or err}): give this user (id "
            f"{os.getuid()}) read access to it, or point data.root at a readable copy"
        ) from None
    if not classes:
        raise UserError(f"{split_dir} has no class folders: {expected}")
    # Real path of every folder listed -> the path it was listed by; the split and the folders
    # above it count as listed, so that a link back up to them is named where it is.
    real = Path(os.path.realpath(split_dir))
    listed = {str(folder): str(folder) for folder in real.parents}
    listed[str(real)] = str(split_dir)
    samples = []
    for index, name in enumerate(classes):
        files = image_files(split_dir / name, listed)
        if not files:
            raise UserError(
                f"{split_dir / name} has no image files ({', '.join(IMG_EXTENSIONS)}): {expected}"
            )
        samples += [(path, index) for path in files]
    return Listing(split_dir, classes, samples)


def image_files(class_dir: Path, listed: dict[str, str]) -> list[str]:
    """The image files under class_dir, subfolders included, sorted as torchvision's
    make_dataset sorts them (by folder, then name). `listed`: the folders listed so far."""
    found: list[tuple[str, list[str]]] = []
    pending = [str(class_dir)]
    while pending:
        folder = pending.pop()
        real = os.path.realpath(folder)
        if real in listed:
            raise UserError(_listed_twice(folder, listed[real], real))
        listed[real] = folder
        files, subfolders = [], []
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir():  # follows a symlink: a linked folder is listed, once
                    subfolders.append(entry.path)
                elif has_file_allowed_extension(entry.name, IMG_EXTENSIONS):
                    files.append(entry.path)
        found.append((folder, sorted(files)))
        pending.extend(subfolders)
    return [path for _, files in sorted(found) for path in files]


def _listed_twice(folder: str, first: str, real: str) -> str:
    parent = os.path.realpath(os.path.dirname(folder))
    if parent == real or parent.startswith(real + os.sep):
        what = f"a symlink loop: {folder} leads back to {first}"
    else:
        what = f"{folder} is a second path to {first}"
    return (
        f"{what} (both are {real}), so its images would be listed more than once: remove or "
        "replace that symlink."
    )


def _names(names: set[str]) -> str:
    shown = sorted(names)[:SHOWN]
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(shown) + more if names else "none"


def class_difference(
    expected: list[str], expected_name: str, found: list[str], found_name: str
) -> str:
    """How two lists of class names differ, for an error message."""
    only_expected, only_found = set(expected) - set(found), set(found) - set(expected)
    if not (only_expected or only_found):  # a shard index can list them in any order
        return f"the same names, in another order: {', '.join(found[:SHOWN])}"
    return (
        f"only in {expected_name}: {_names(only_expected)}; only in {found_name}: "
        f"{_names(only_found)}"
    )


def check_same_classes(
    split_classes: dict[str, list[str]],
    where: str,
    advice: str = "",
    named: list[str] | None = None,
) -> None:
    """Every split has the class folders behind the class indices, in their order: train/'s,
    or `named` (data.classes) where the names are given."""
    reference = split_classes["train"] if named is None else named
    for split, classes in split_classes.items():
        if classes == reference:
            continue
        if named is None:
            what = f"{where}/train and {where}/{split} have different class folders"
            difference = class_difference(reference, "train", classes, split)
            index, fix = "its place among the sorted folder names", "Give both splits the same"
        else:
            what = (
                f"{where}/{split} has other class folders than data.classes, the "
                f"{len(named)} class names the model was trained on (eval.py reads them from its "
                "checkpoint)"
            )
            difference = class_difference(reference, "data.classes", classes, split)
            index, fix = "its place in data.classes", f"Give {split}/ data.classes' names as its"
        raise UserError(
            f"{what} ({difference}): a class's index is {index}, so {split}/ would be scored "
            f"against the wrong labels. {fix} class folders{advice}."
        )


def check_classes(
    split_classes: dict[str, list[str]],
    num_classes: int,
    where: str,
    named: list[str] | None = None,
) -> None:
    """Every split has the class folders behind the class indices (train/'s, or `named`:
    data.classes), and data.num_classes is their number."""
    reference = split_classes["train"] if named is None else named
    counted = f"{where}/train has" if named is None else "data.classes names"
    source = "train/'s classes" if named is None else "data.classes' names"
    wrong_count = len(reference) != num_classes
    advice = f"; and set data.num_classes={len(reference)} ({source})" if wrong_count else ""
    check_same_classes(split_classes, where, advice, named)
    if wrong_count:
        raise UserError(
            f"data.num_classes={num_classes} but {counted} {len(reference)} classes: set "
            f"data.num_classes={len(reference)}."
        )
