"""scikit-learn's 8x8 handwritten digits as a real, tiny ImageFolder dataset."""

import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from vitrain.data.imagefolder import ImageFolderDataModule
from vitrain.errors import UserError, docker_hint

_COMPLETE = ".complete"


def write_digits_imagefolder(root: Path, val_fraction: float, split_seed: int) -> None:
    """Write train/<digit>/*.png and val/<digit>/*.png once; a marker file says it is whole."""
    if (root / _COMPLETE).exists():
        return
    try:
        _write(root, val_fraction, split_seed)
    except OSError as err:
        # A read-only data mount, or a folder that Docker created as root for the volume.
        raise UserError(
            f"cannot write the digits data set to data.root={root} "
            f"({err.strerror or err}): make {root.parent} writable, or write it elsewhere "
            "with data.root=/writable/path/digits."
            + docker_hint(
                f"mount a host folder that this user can write at {root.parent}; compose "
                "mounts VITRAIN_DATA (default ./data) at /data, so run `mkdir -p data` before "
                "the first run, or `chown` a folder Docker created"
            )
        ) from None


def _write(root: Path, val_fraction: float, split_seed: int) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    indices = np.arange(len(images))
    train_idx, val_idx = train_test_split(
        indices, test_size=val_fraction, random_state=split_seed, stratify=digits.target
    )
    root.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: an interrupted write never looks complete.
    staging = Path(tempfile.mkdtemp(prefix=".digits-", dir=root.parent))
    for split, idx in (("train", train_idx), ("val", val_idx)):
        for i in idx:
            folder = staging / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
    (staging / _COMPLETE).write_text(f"val_fraction={val_fraction} split_seed={split_seed}\n")
    if root.exists():
        shutil.rmtree(root)
    staging.rename(root)


class DigitsDataModule(ImageFolderDataModule):
    """data=digits: the digits ImageFolder, written on first use, then data=imagenet's reader."""

    def __init__(self, *, val_fraction: float = 0.2, split_seed: int = 0, **imagefolder) -> None:
        super().__init__(**imagefolder)
        self.val_fraction = val_fraction
        self.split_seed = split_seed

    def prepare_data(self) -> None:
        write_digits_imagefolder(self.root_path, self.val_fraction, self.split_seed)

    def check(self, stage: str = "fit") -> None:
        self.prepare_data()
        super().check(stage)
