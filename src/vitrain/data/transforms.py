"""Train and eval transforms (timm's create_transform: the DeiT/timm ImageNet pipeline)."""

from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import RandAugment, posterize


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


def train_transform(image_size: int, augment: dict, mean, std):
    """RandomResizedCrop + flip (+ RandAugment, random erasing) + normalise."""
    transform = create_transform(
        input_size=image_size,
        is_training=True,
        scale=tuple(augment["scale"]),
        ratio=tuple(augment["ratio"]),
        hflip=augment["hflip"],
        auto_augment=augment["auto_augment"],
        re_prob=augment["re_prob"],
        re_mode="pixel",
        interpolation=augment["interpolation"],
        mean=tuple(mean),
        std=tuple(std),
    )
    for step in transform.transforms:
        if isinstance(step, RandAugment):
            pillow13_safe(step)
    return transform


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
