"""The ImageFolder layout, listed once for every reader of it: root/<split>/<class>/<image files>.

The ImageFolder loader, DALI, the shard writer and `python -m vitrain.data.check` all list a
split here, so that they agree on the classes, their indices (sorted class-folder names, as
torchvision's ImageFolder numbers them: checkpoints move between data=imagenet, imagenet_dali and
imagenet_shards) and which files are images.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from vitrain.errors import UserError

SPLITS = ("train", "val")


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
    """Every image file of split_dir/<class>/..., in torchvision ImageFolder's order."""
    split_dir = Path(split_dir)
    expected = f"expected {split_dir}/<class>/<image files>"
    if not split_dir.is_dir():
        raise UserError(f"{split_dir} does not exist: {expected}")
    try:
        entries = list(split_dir.iterdir())
    except OSError as err:
        raise UserError(
            f"cannot read {split_dir} ({err.strerror or err}): give this user (id "
            f"{os.getuid()}) read access to it, or point data.root at a readable copy"
        ) from None
    if not any(p.is_dir() for p in entries):
        raise UserError(f"{split_dir} has no class folders: {expected}")
    classes, class_to_index = find_classes(str(split_dir))
    try:
        samples = make_dataset(str(split_dir), class_to_index, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:  # a class folder without image files
        raise UserError(f"{split_dir}: {err} ({expected})") from None
    return Listing(split_dir, classes, samples)


def check_classes(split_classes: dict[str, list[str]], num_classes: int, where: str) -> None:
    """data.num_classes must be the number of classes each split has."""
    for split, classes in split_classes.items():
        if len(classes) != num_classes:
            raise UserError(
                f"data.num_classes={num_classes} but {where}/{split} has {len(classes)} classes: "
                f"set data.num_classes={len(classes)}."
            )
