"""Model FLOPs per training image, counted by torch.utils.flop_counter on a meta-device copy."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from vitrain.models.factory import create_vit


def training_flops_per_image(model_cfg: dict) -> float:
    """Forward + backward FLOPs of one image through the configured model at its image size.

    Built on the meta device: shapes only, no memory, no compute, well under a second even for
    ViT-L. Gradient checkpointing is left out on purpose: MFU counts model FLOPs, not recompute.
    """
    # No weights on the meta device (init_from): shapes are all the count needs.
    cfg = {**model_cfg, "grad_checkpointing": False, "drop_path_rate": 0.0, "init_from": None}
    with torch.device("meta"):
        model = create_vit(**cfg)
        images = torch.empty(1, 3, cfg["img_size"], cfg["img_size"])
    with FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    return float(counter.get_total_flops())
