"""What data.augment asks for, decided once for every loader.

data.augment keys: scale, ratio (RandomResizedCrop), crop (rrc: RandomResizedCrop; src: DeiT III's
Simple Random Crop), hflip, auto_augment (timm's policy string: rand-... RandAugment, 3a DeiT
III's 3-Augment, or null), color_jitter (brightness = contrast = saturation factor, or null),
re_prob (random erasing), interpolation.

3-Augment (DeiT III, facebookresearch/deit augment.py; timm's `3a` policy): for every image one of
grayscale, solarisation (threshold 128) and Gaussian blur (radius 0.1-2.0), chosen uniformly,
then colour jitter. Colour jitter follows timm's create_transform: off under RandAugment and the
other policies, on under 3a or without a policy.
"""

from vitrain.errors import UserError

CROPS = ("rrc", "src")
SRC_PADDING = 4  # Simple Random Crop pads reflectively by 4 px before its random crop (DeiT III)
THREE_AUGMENT = "3a"


def policy(augment: dict) -> str | None:
    return augment.get("auto_augment") or None


def three_augment(augment: dict) -> bool:
    return policy(augment) == THREE_AUGMENT


def rand_augment(augment: dict) -> str | None:
    """The RandAugment policy string, when the recipe has one."""
    name = policy(augment)
    return name if name and name.startswith("rand") else None


def color_jitter(augment: dict) -> float | None:
    """The colour-jitter factor that applies (timm's rule: not under RandAugment & co)."""
    factor = augment.get("color_jitter")
    if not factor:
        return None
    if policy(augment) not in (None, THREE_AUGMENT):
        return None
    return float(factor)


def crop(augment: dict) -> str:
    return augment.get("crop", "rrc")


def check_augment(augment: dict, loader: str) -> None:
    """Refuse, by name, what `loader` (fast, pil, dali) cannot do with data.augment."""
    if crop(augment) not in CROPS:
        raise UserError(
            f"data.augment.crop={crop(augment)} is not one of {', '.join(CROPS)} (rrc: "
            "RandomResizedCrop, src: DeiT III's Simple Random Crop)."
        )
    factor = augment.get("color_jitter")
    if factor is not None and not 0 <= float(factor) < 1:
        raise UserError(
            f"data.augment.color_jitter={factor}: a factor in [0, 1) (DeiT III: 0.3), or null."
        )
    name = policy(augment)
    if loader == "fast" and name and name != THREE_AUGMENT and not rand_augment(augment):
        raise UserError(
            f"data.augment.auto_augment={name}: data.loader=fast applies RandAugment (rand-...) "
            "and 3-Augment (3a) only: use one of those, or data.loader=pil for timm's others."
        )
    if loader == "dali" and (crop(augment) != "rrc" or name == THREE_AUGMENT or factor):
        raise UserError(
            "data=imagenet_dali follows the DeiT recipe (RandomResizedCrop, RandAugment): "
            "data.augment.crop=src, auto_augment=3a and color_jitter need data=imagenet "
            "(data.loader=fast or pil)."
        )
