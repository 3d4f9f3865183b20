"""Which samples each training batch held: a folder of one-colour images whose colour is the
sample's number, and a callback that reads the numbers back from the batches.

A one-colour image stays that colour through any crop, resize or flip, so with data.mean=0 and
data.std=1 every pixel of a training batch says which file it came from. SampleRecorder is a
probe (train(cfg, callbacks=[...])) in this process, and a configured callback in train.py's
DDP ranks: `+callbacks.recorder._target_=sample_recorder.SampleRecorder
+callbacks.recorder.out_dir=DIR` with tests/ on PYTHONPATH.
"""

import json
import os
from pathlib import Path

from lightning.pytorch import Callback
from PIL import Image

# The settings that keep the colours: no RandAugment, no erasing, no mixing, no normalisation.
PLAIN_COLOURS = [
    "data.augment.auto_augment=null",
    "data.augment.re_prob=0",
    "data.mean=[0,0,0]",
    "data.std=[1,1,1]",
    "recipe.mixup_alpha=0",
    "recipe.cutmix_alpha=0",
]


# A training run on colour_folder's images: 8 px, 2 classes, a global batch of 8.
COLOUR_RUN = [*PLAIN_COLOURS, "data.num_classes=2", "data.image_size=8", "data.batch_size=8"]


def colour(number: int) -> tuple[int, int, int]:
    return number % 256, number // 256, 128


def colour_folder(root: Path, train: int = 48, val: int = 16, classes: int = 2) -> Path:
    """root/{train,val}/<class>/<n>.png, the n-th image of a split coloured colour(n)."""
    for split, count in (("train", train), ("val", val)):
        for number in range(count):
            folder = root / split / f"class{number % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), colour(number)).save(folder / f"{number:05d}.png")
    return root


class SampleRecorder(Callback):
    """Appends one JSON line per training batch to out_dir/rank<r>-<pid>.jsonl: the epoch, the
    global step before it and the numbers of its samples. At the batch's start: a batch that
    starts is trained (a stop signal is acted on at the end of a batch), and this callback may
    come after vitrain's stop in the callback list."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pixels = (batch.images[:, :2, 0, 0] * 255).round().long().tolist()
        record = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "rank": trainer.global_rank,
            "samples": [red + 256 * green for red, green in pixels],
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / f"rank{trainer.global_rank}-{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def recorded(out_dir: Path) -> list[dict]:
    """Every record of every rank and attempt."""
    return [json.loads(line) for path in sorted(out_dir.glob("*.jsonl")) for line in path.open()]


def samples_of_epoch(out_dir: Path, epoch: int) -> list[int]:
    return [n for r in recorded(out_dir) if r["epoch"] == epoch for n in r["samples"]]
