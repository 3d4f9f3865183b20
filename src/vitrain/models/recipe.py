"""What a recipe makes of a batch before the loss: timm's Mixup / CutMix and the training loss.

Shared by the LightningModule and bench/throughput.py's hand-written loop, so that both train
the same thing.
"""

from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn


def recipe_mixes(recipe: dict) -> bool:
    """Whether the recipe mixes images (timm's Mixup / CutMix): soft targets, an even batch."""
    return recipe["mixup_alpha"] > 0 or recipe["cutmix_alpha"] > 0


def training_loss(recipe: dict, num_classes: int) -> tuple[Mixup | None, nn.Module]:
    """(mixup, criterion): timm's Mixup when the recipe mixes (it makes soft targets, label
    smoothing included) with the soft-target cross-entropy; else None and a cross-entropy that
    smooths the labels itself."""
    if not recipe_mixes(recipe):
        return None, nn.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"])
    mixup = Mixup(
        mixup_alpha=recipe["mixup_alpha"],
        cutmix_alpha=recipe["cutmix_alpha"],
        prob=recipe["mixup_prob"],
        switch_prob=recipe["mixup_switch_prob"],
        label_smoothing=recipe["label_smoothing"],
        num_classes=num_classes,
    )
    return mixup, SoftTargetCrossEntropy()
