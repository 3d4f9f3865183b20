"""timm ViTs from config: sized by the data, random init or weights from a file, no download."""

import difflib

import timm
from torch import nn

from vitrain.errors import UserError
from vitrain.models.weights import load_weights, print_report


def create_vit(
    name: str,
    patch_size: int,
    img_size: int,
    num_classes: int,
    drop_path_rate: float = 0.0,
    grad_checkpointing: bool = False,
    fused_attn: bool = True,
    init_values: float | None = None,
    dynamic_img_size: bool = False,
    kwargs: dict | None = None,
    init_from: str | None = None,
    init_from_ema: bool = True,
) -> nn.Module:
    """A timm VisionTransformer built from `name` with the data's image size and classes.

    init_from: a file of weights to start from (vitrain.models.weights: a vitrain checkpoint, a
    timm / safetensors or a plain state dict); only the weights, so a run from them starts at step
    0. init_from_ema: of a vitrain checkpoint with EMA weights, those (true) or the raw ones.

    fused_attn: attention through F.scaled_dot_product_attention (flash / memory-efficient
    kernels) instead of timm's explicit softmax(q @ k^T) @ v; set on every attention block, so
    that it does not depend on timm's process-wide default or the TIMM_FUSED_ATTN variable.
    init_values: LayerScale's initial factor (timm's init_values); dynamic_img_size: any input
    size, the position embedding resampled to its grid (timm's dynamic_img_size).
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models("*vit*"), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UserError(
            f"model.name={name} is not a timm model.{hint} "
            "Pick a preset with model=vit_micro|vit_ti16|vit_s16|vit_b16|vit_b32|vit_l16."
        )
    if img_size % patch_size:
        fit = img_size // patch_size * patch_size or patch_size
        raise UserError(
            f"data.image_size={img_size} is not divisible by model.patch_size={patch_size}: "
            f"use a multiple of {patch_size}, e.g. data.image_size={fit}."
        )
    model = timm.create_model(
        name,
        pretrained=False,
        num_classes=num_classes,
        img_size=img_size,
        patch_size=patch_size,
        drop_path_rate=drop_path_rate,
        init_values=init_values,
        dynamic_img_size=dynamic_img_size,
        **(kwargs or {}),
    )
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = bool(fused_attn)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    if init_from:
        print_report(load_weights(model, init_from, ema=init_from_ema))
    return model
