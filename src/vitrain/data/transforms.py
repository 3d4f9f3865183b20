"""Train and eval transforms (timm's create_transform: the DeiT/timm ImageNet pipeline)."""

from timm.data import create_transform


def train_transform(image_size: int, augment: dict, mean, std):
    """RandomResizedCrop + flip (+ RandAugment, random erasing) + normalise."""
    return create_transform(
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
