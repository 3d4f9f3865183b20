"""Image decoding that tells a bad file from a good one, and an ImageFolder that survives them."""

from collections.abc import Callable
from pathlib import Path

from PIL import Image
from torchvision.datasets import ImageFolder

from vitrain.errors import UserError

ON_BAD_SAMPLE = ("skip", "error")
# What PIL and the OS raise for truncated, empty, non-image or unreadable files.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# Consecutive bad files tolerated before the folder is declared broken.
_MAX_CONSECUTIVE_BAD = 16


def load_rgb(path: str) -> Image.Image:
    """Decode the whole image now (PIL is lazy), so that a truncated file fails here."""
    with open(path, "rb") as handle:
        image = Image.open(handle)
        image.load()
        return image.convert("RGB")


class BadSampleError(UserError):
    pass


class RobustImageFolder(ImageFolder):
    """ImageFolder whose samples are (image, target, bad_files).

    A file that cannot be decoded is replaced by the next good sample, and its path travels with
    the batch (bad_files, ";"-joined, usually "") so that the main process can count and report
    it: DataLoader workers are separate processes. on_bad_sample="error" raises instead.

    loader(path) decodes a file and raises one of IMAGE_ERRORS for a bad one: load_rgb (a PIL
    image for `transform`), or the fast path's decode.SampleTransform, which decodes and augments
    in one step (the crop is chosen before decoding) and needs no `transform`.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable | None,
        on_bad_sample: str = "skip",
        loader: Callable = load_rgb,
    ) -> None:
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise UserError(f"data.on_bad_sample={on_bad_sample} is not one of skip, error.")
        super().__init__(str(root), transform=transform, loader=loader)
        self.on_bad_sample = on_bad_sample

    def __getitem__(self, index: int):
        bad: list[str] = []
        for offset in range(_MAX_CONSECUTIVE_BAD):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                image = self.loader(path)
            except IMAGE_ERRORS as err:
                if self.on_bad_sample == "error":
                    raise BadSampleError(
                        f"cannot read {path}: {err}. Remove or replace it (list them all with "
                        "`python -m vitrain.data.check DATA_ROOT`), or set data.on_bad_sample=skip."
                    ) from None
                bad.append(path)
                continue
            sample = self.transform(image) if self.transform is not None else image
            return sample, target, ";".join(bad)
        raise BadSampleError(
            f"{_MAX_CONSECUTIVE_BAD} consecutive unreadable files from {bad[0]}: is {self.root} "
            "an image dataset? Check it with `python -m vitrain.data.check DATA_ROOT`."
        )
