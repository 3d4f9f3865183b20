"""What a recipe makes of a batch before the loss: timm's Mixup / CutMix and the training loss.

Shared by the LightningModule and bench/throughput.py's hand-written loop, so that both train
the same thing.
"""

from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from vitrain.errors import UserError

LOSSES = ("ce", "bce")
FUSED_OPTIMIZERS = ("adamw", "adam")  # torch's fused kernels; timm's LAMB has none
LR_SCALINGS = ("linear", "none")


def recipe_mixes(recipe: dict) -> bool:
    """Whether the recipe mixes images (timm's Mixup / CutMix): soft targets, an even batch."""
    return recipe["mixup_alpha"] > 0 or recipe["cutmix_alpha"] > 0


def learning_rate(recipe: dict, images_per_update: int) -> float:
    """recipe.base_lr, scaled by images per update / 512 (DeiT's rule) with lr_scaling=linear;
    as it is with lr_scaling=none (DeiT III's --unscale-lr: base_lr is the learning rate)."""
    scaling = recipe.get("lr_scaling", "linear")
    if scaling not in LR_SCALINGS:
        raise UserError(f"recipe.lr_scaling={scaling} is not one of {', '.join(LR_SCALINGS)}.")
    return recipe["base_lr"] * (images_per_update / 512 if scaling == "linear" else 1.0)


def _criterion(recipe: dict, mixing: bool) -> nn.Module:
    loss = recipe.get("loss", "ce")
    if loss not in LOSSES:
        raise UserError(f"recipe.loss={loss} is not one of {', '.join(LOSSES)}.")
    if loss == "bce":
        # Mixup already smoothed its soft targets; index targets get the smoothing here.
        # target_threshold 0 (DeiT III): every class mixed into an image is a positive.
        return BinaryCrossEntropy(
            smoothing=0.0 if mixing else recipe["label_smoothing"],
            target_threshold=recipe.get("bce_target_threshold"),
        )
    if mixing:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"])


def training_loss(recipe: dict, num_classes: int) -> tuple[Mixup | None, nn.Module]:
    """(mixup, criterion): timm's Mixup when the recipe mixes (it makes soft targets, label
    smoothing included), and the loss of recipe.loss: cross-entropy (soft-target with mixup), or
    timm's binary cross-entropy (DeiT III)."""
    mixing = recipe_mixes(recipe)
    if not mixing:
        return None, _criterion(recipe, mixing)
    mixup = Mixup(
        mixup_alpha=recipe["mixup_alpha"],
        cutmix_alpha=recipe["cutmix_alpha"],
        prob=recipe["mixup_prob"],
        switch_prob=recipe["mixup_switch_prob"],
        label_smoothing=recipe["label_smoothing"],
        num_classes=num_classes,
    )
    return mixup, _criterion(recipe, mixing)
