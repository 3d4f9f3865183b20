"""data.loader=pil: an encoded image -> PIL -> timm's create_transform (the DeiT/timm ImageNet
pipeline, the reference the fast path is tested against); floats made in the worker."""

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import RandAugment, posterize
from timm.data.transforms import str_to_interp_mode
from torchvision import transforms

from vitrain.data.augmentation import SRC_PADDING, check_augment, crop

Encoded = bytes | str | Path  # a file's bytes (shards) or its path (an ImageFolder)


def read_encoded(source: Encoded) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    with open(source, "rb") as handle:
        return handle.read()


# Pixel modes whose values PIL's convert("RGB") clips to 255 (a 16-bit PNG became almost white):
# 16-bit grey is scaled to 8 bits instead. 32-bit integer and float pixels have no agreed range,
# so they are refused, by name.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
REFUSED_MODES = {"I": "32-bit integer", "F": "32-bit float"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, for both loaders (the fast path's PIL fallback too).

    16-bit grey keeps its brightness (the top 8 bits); other modes go through PIL's convert
    (48/64-bit RGB(A) PNGs PIL already reads as 8-bit RGB(A)). Raises ValueError, which the
    bad-sample rule catches and names, for a mode with no 8-bit meaning."""
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.uint16)  # native order, whatever the file's
        image = Image.fromarray((pixels >> 8).astype(np.uint8), mode="L")
    elif image.mode in REFUSED_MODES:
        raise ValueError(
            f"{REFUSED_MODES[image.mode]} pixels (PIL mode {image.mode}) have no 8-bit "
            "meaning: convert the image to 8 or 16 bits per channel"
        )
    return image.convert("RGB")


def load_rgb(source: Encoded) -> Image.Image:
    """Decode the whole image now (PIL is lazy), so that a truncated file fails here, inside the
    bad-sample rule, and not later in a transform."""
    with Image.open(io.BytesIO(read_encoded(source))) as image:
        image.load()
        return to_rgb(image)


def _posterize(image: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, with Pillow < 13's answer for 0 bits: every bit masked, a black image."""
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return posterize(image, bits_to_keep, **kwargs)


def pillow13_safe(rand_augment: RandAugment) -> RandAugment:
    """timm (1.0.31) asks PosterizeIncreasing for 0 bits at high magnitudes (m9 + mstd0.5 noise
    reaches them); Pillow 13 raises ValueError for 0 bits where older Pillow returned a black image.
    Keep the older result, so that the recipe is unchanged and no worker dies mid-epoch."""
    for op in rand_augment.ops:
        if op.aug_fn is posterize:
            op.aug_fn = _posterize
    return rand_augment


def simple_random_crop(image_size: int, interpolation: str, hflip: float) -> list:
    """DeiT III's Simple Random Crop (augment.py): the shorter side resized to the image size,
    a random crop of it with 4 px of reflective padding, the flip."""
    return [
        transforms.Resize(image_size, interpolation=str_to_interp_mode(interpolation)),
        transforms.RandomCrop(image_size, padding=SRC_PADDING, padding_mode="reflect"),
        transforms.RandomHorizontalFlip(hflip),
    ]


def train_transform(image_size: int, augment: dict, mean, std) -> transforms.Compose:
    """timm's training transform: the crop (RandomResizedCrop, or SRC) + flip, the policy
    (RandAugment, 3-Augment: timm's `3a`) and colour jitter as timm applies them, normalise.
    Random erasing is not here: every source erases on the device (vitrain.data.on_device)."""
    check_augment(augment, "pil")
    primary, secondary, final = create_transform(
        input_size=image_size,
        is_training=True,
        scale=tuple(augment["scale"]),
        ratio=tuple(augment["ratio"]),
        hflip=augment["hflip"],
        auto_augment=augment["auto_augment"],
        color_jitter=augment.get("color_jitter"),
        re_prob=0.0,
        interpolation=augment["interpolation"],
        mean=tuple(mean),
        std=tuple(std),
        separate=True,
    )
    steps = list(primary.transforms) + list(secondary.transforms) + list(final.transforms)
    if crop(augment) == "src":
        steps = simple_random_crop(image_size, augment["interpolation"], augment["hflip"]) + [
            *secondary.transforms,
            *final.transforms,
        ]
    for step in steps:
        if isinstance(step, RandAugment):
            pillow13_safe(step)
    return transforms.Compose(steps)


def eval_transform(image_size: int, crop_pct: float, interpolation: str, mean, std):
    """Resize(image_size / crop_pct) + CenterCrop(image_size) + normalise."""
    return create_transform(
        input_size=image_size,
        is_training=False,
        crop_pct=crop_pct,
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
    )


class PilSampleTransform:
    """Encoded image -> float (3, size, size), normalised; a class so that workers can pickle it."""

    def __init__(
        self, split: str, image_size: int, augment: dict, eval_crop_pct: float, mean, std
    ) -> None:
        if split == "train":
            self.transform = train_transform(image_size, augment, mean, std)
        else:
            interpolation = augment["interpolation"]
            self.transform = eval_transform(image_size, eval_crop_pct, interpolation, mean, std)

    def __call__(self, source: Encoded) -> torch.Tensor:
        return self.transform(load_rgb(source))
