"""Weights from a file into a timm ViT, adapted the way timm adapts pretrained weights.

The files: a vitrain checkpoint (Lightning's .ckpt: the EMA weights when the run averaged them,
or the raw ones), a timm / safetensors state dict, a plain .pth/.pt state dict or a training
checkpoint holding one (timm's `state_dict` / `state_dict_ema`, DeiT's `model`). Adapting: the
position embedding resampled to the model's patch grid and the patch embedding to its patch size
(timm's ViT checkpoint filter), a head of another class count left out (re-initialised). Any other
difference in shape is an error naming the tensor. What was loaded, re-initialised, resampled,
missing and unexpected comes back as a LoadReport, printed by `print_report`.
"""

import argparse
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only
from safetensors.torch import load_file
from timm.models import clean_state_dict
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from vitrain.errors import UserError

# vitrain's LightningModule holds the timm model as `self.model`: its checkpoint keys carry this.
MODULE_PREFIX = "model."
# Lightning's WeightAveraging (EMAWeightAveraging) saves the average in `state_dict` and moves the
# weights being trained to this key.
RAW_WEIGHTS_KEY = "current_model_state"
# Where timm's load_state_dict looks in a training checkpoint, in its order (EMA first when asked).
_EMA_KEYS = ("state_dict_ema", "model_ema")
_WEIGHTS_KEYS = ("state_dict", "model")


@dataclass
class Weights:
    """A state dict keyed as timm names a model's tensors, and which weights of the file it is."""

    tensors: dict[str, torch.Tensor]
    kind: str


@dataclass
class LoadReport:
    """What loading a file into a model did; `lines()` is what the run prints."""

    source: str  # the setting and the file
    kind: str  # which weights of the file (Weights.kind)
    loaded: list[str]
    reinitialised: list[str]
    reinitialised_why: str
    resampled: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    missing: list[str]
    unexpected: list[str]

    def lines(self) -> list[str]:
        def names(keys: list[str]) -> str:
            return ", ".join(keys) if keys else "none"

        reinit = names(self.reinitialised)
        if self.reinitialised:
            reinit += f" ({self.reinitialised_why})"
        resampled = ", ".join(f"{k} {list(a)} -> {list(b)}" for k, a, b in self.resampled)
        return [
            f"{self.source}: {self.kind}",
            f"  loaded          {len(self.loaded)} tensors",
            f"  re-initialised  {reinit}",
            f"  resampled       {resampled or 'none'}",
            f"  missing         {names(self.missing)}",
            f"  unexpected      {names(self.unexpected)}",
        ]


@rank_zero_only
def print_report(report: LoadReport) -> None:
    print("\n".join(report.lines()), flush=True)


def read_checkpoint(path: str | Path, setting: str) -> dict:
    """The file's contents: tensors only (safetensors), or what torch.load gives without running
    pickled code (weights_only; timm's and DeiT's checkpoints keep their argparse arguments)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{setting}={path} is not a file: give the path of a checkpoint or weights."
        )
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        # mmap: only the tensors used are read (a checkpoint also holds the optimizer's moments).
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(
                path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
            )
    except Exception as err:  # anything a file that is no checkpoint makes the readers raise
        text = str(err).strip()
        first_line = f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
        raise UserError(
            f"{setting}={path} cannot be read as weights ({first_line}). vitrain reads "
            "safetensors files and torch.save files that need no code to unpickle (a state dict "
            "or a checkpoint holding one): re-save it with torch.save(model.state_dict(), path)."
        ) from None


def read_run_checkpoint(path: str | Path, setting: str) -> dict:
    """A checkpoint train.py wrote: Lightning's, with the module's settings (hyper_parameters:
    create_vit's arguments, the recipe) and the datamodule's (datamodule_hyper_parameters)."""
    checkpoint = read_checkpoint(path, setting)
    if "model" not in (checkpoint.get("hyper_parameters") or {}):
        raise UserError(
            f"{setting}={path} is not a checkpoint of a vitrain run (it has no model settings): "
            "give a .ckpt from a run's checkpoints/ folder. Other weights start a training run "
            "with model.init_from=<file>."
        )
    return checkpoint


def select_weights(checkpoint: dict, ema: bool) -> Weights:
    """The model's weights in a checkpoint, keyed as timm names them (no `model.`, `module.` or
    torch.compile's `_orig_mod.` prefixes)."""
    if "pytorch-lightning_version" in checkpoint:
        averaged = RAW_WEIGHTS_KEY in checkpoint
        if averaged and not ema:
            state, kind = checkpoint[RAW_WEIGHTS_KEY], "raw weights (it also has EMA weights)"
        elif averaged:
            state, kind = checkpoint["state_dict"], "EMA weights"
        else:
            state, kind = checkpoint["state_dict"], "weights (it has no EMA weights)"
        tensors = {
            k.removeprefix(MODULE_PREFIX): v
            for k, v in state.items()
            if k.startswith(MODULE_PREFIX)
        }
        return Weights(clean_state_dict(tensors), f"vitrain checkpoint, {kind}")
    for key in (_EMA_KEYS if ema else ()) + _WEIGHTS_KEYS:
        if isinstance(checkpoint.get(key), dict):
            return Weights(_tensors(checkpoint[key]), f"state dict '{key}'")
    return Weights(_tensors(checkpoint), "state dict")


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    return clean_state_dict({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})


def classifier_keys(model: nn.Module) -> list[str]:
    """The head's tensors, as timm's pretrained config names the classifier(s) of each model."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return [f"{name}.{kind}" for name in names for kind in ("weight", "bias")]


def load_weights(
    model: nn.Module,
    path: str | Path,
    ema: bool = True,
    setting: str = "model.init_from",
    exact: bool = False,
) -> LoadReport:
    """Load the file's weights into `model` (in place); returns what was done.

    setting: the config key the path came from, for the messages. exact: every tensor of the model
    must come from the file (evaluation, export): a re-initialised head, a missing or an
    unexpected tensor is an error; resampling is allowed (evaluation at another image size).
    """
    weights = select_weights(read_checkpoint(path, setting), ema)
    tensors, before = weights.tensors, {k: tuple(v.shape) for k, v in weights.tensors.items()}
    if isinstance(model, VisionTransformer):
        # timm's own adaptation of pretrained ViT weights (resample_abs_pos_embed to the model's
        # patch grid, resample_patch_embed to its patch size, older layouts converted).
        tensors = checkpoint_filter_fn(tensors, model)
    target = model.state_dict()
    resampled = [
        (k, before[k], tuple(v.shape))
        for k, v in tensors.items()
        if k in before and tuple(v.shape) != before[k]
    ]
    head = [k for k in classifier_keys(model) if k in tensors and k in target]
    reinitialised = [k for k in head if tensors[k].shape != target[k].shape]
    why = ""
    if reinitialised:
        why = (
            f"{tensors[reinitialised[0]].shape[0]} classes in the file, "
            f"{target[reinitialised[0]].shape[0]} here"
        )
        tensors = {k: v for k, v in tensors.items() if k not in reinitialised}
    architecture = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    mismatched = [k for k in target if k in tensors and tensors[k].shape != target[k].shape]
    if mismatched:
        key = mismatched[0]
        others = f" (and {len(mismatched) - 1} more tensors)" if len(mismatched) > 1 else ""
        raise UserError(
            f"{setting}={path}: {key} is {list(tensors[key].shape)} in the file but "
            f"{list(target[key].shape)} in {architecture}{others}. The weights belong to another "
            "architecture: choose the model they were trained as (model=..., model.name, "
            "model.patch_size, model.kwargs.embed_dim / depth / num_heads)."
        )
    loaded = [k for k in tensors if k in target]
    if not loaded:
        raise UserError(
            f"{setting}={path}: none of its {len(tensors)} tensors has a name of {architecture} "
            f"(the file: {', '.join(list(tensors)[:3]) or 'no tensors'}; the model: "
            f"{', '.join(list(target)[:3])}). Give a timm state dict of this model or a vitrain "
            "checkpoint."
        )
    result = model.load_state_dict(tensors, strict=False)
    report = LoadReport(
        source=f"{setting}={path}",
        kind=weights.kind,
        loaded=loaded,
        reinitialised=reinitialised,
        reinitialised_why=why,
        resampled=resampled,
        missing=[k for k in result.missing_keys if k not in reinitialised],
        unexpected=list(result.unexpected_keys),
    )
    if exact and (report.reinitialised or report.missing or report.unexpected):
        differences = [
            f"{what} {', '.join(keys)}"
            for what, keys in (
                ("re-initialised", report.reinitialised),
                ("missing", report.missing),
                ("unexpected", report.unexpected),
            )
            if keys
        ]
        raise UserError(
            f"{setting}={path} does not hold every tensor of {architecture} "
            f"({'; '.join(differences)}): it is a checkpoint of another model."
        )
    return report
