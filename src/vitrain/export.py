"""`python -m vitrain.export CHECKPOINT DIR [--raw]`: a vitrain checkpoint as weights plain timm
loads, README "After training".

DIR gets model.safetensors (the EMA weights when the checkpoint has them, under timm's own tensor
names) and config.json in timm's form (architecture, num_classes, label_names: the class names in
index order, the create_model arguments and the pretrained_cfg with the run's input size, mean,
std, crop_pct and interpolation), both written by timm's save_for_hf, so that
`timm.create_model(...)` with that config, or `timm.create_model("local-dir:DIR", pretrained=True)`,
rebuilds the trained model. Both files get the mode open() gives a new file (0644 under umask 022).
"""

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from timm.models import save_for_hf

from vitrain.errors import UserError
from vitrain.models.factory import create_vit
from vitrain.models.weights import load_weights, print_report, read_run_checkpoint

SETTING = "checkpoint"
FILES = ("model.safetensors", "config.json")


def current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def export_for_timm(checkpoint_path: str | Path, out_dir: str | Path, ema: bool = True) -> Path:
    """Write DIR/model.safetensors and DIR/config.json from a vitrain checkpoint; returns DIR."""
    checkpoint = read_run_checkpoint(checkpoint_path, SETTING)
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    missing = [
        k for k in ("image_size", "mean", "std", "eval_crop_pct", "augment") if k not in data
    ]
    if missing:
        raise UserError(
            f"{SETTING}={checkpoint_path}: its run's data settings lack {', '.join(missing)} (a "
            "run on data=synthetic?): the exported config would not say how to prepare images."
        )
    # The model as trained, from create_vit's arguments in the checkpoint (not its init_from).
    model = create_vit(**{**checkpoint["hyper_parameters"]["model"], "init_from": None})
    print_report(load_weights(model, checkpoint_path, ema=ema, setting=SETTING, exact=True))
    size = data["image_size"]
    data_config = {
        "input_size": (3, size, size),
        "mean": tuple(data["mean"]),
        "std": tuple(data["std"]),
        "crop_pct": data["eval_crop_pct"],
        "crop_mode": "center",
        "interpolation": data["augment"]["interpolation"],
    }
    # tag and license describe the registry's pretrained weights this model was named after,
    # not these.
    model_config = {"pretrained_cfg": {"tag": None, "license": None}}
    classes = data.get("classes")
    if classes:  # timm writes them at the top level, as save_for_hf / push_to_hf_hub do
        model_config["label_names"] = list(classes)
    else:
        print(
            f"{SETTING}={checkpoint_path}: no class names in it (a checkpoint written before runs "
            "recorded them): config.json gets no label_names.",
            flush=True,
        )
    out_dir = Path(out_dir)
    save_for_hf(
        model.eval(),
        out_dir,
        model_config=model_config,
        safe_serialization=True,
        data_config=data_config,
    )
    # safetensors writes through a temp file (mode 0600) that it renames: give both files the
    # mode of any new file, for whoever shares the folder or serves it.
    mode = 0o666 & ~current_umask()
    for name in FILES:
        os.chmod(out_dir / name, mode)
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m vitrain.export",
        description="Write a vitrain checkpoint as model.safetensors + config.json for timm.",
    )
    parser.add_argument("checkpoint", help="a .ckpt written by train.py")
    parser.add_argument("dir", help="the folder to write (created if needed)")
    parser.add_argument(
        "--raw", action="store_true", help="the raw weights instead of the EMA ones"
    )
    args = parser.parse_args(argv)
    try:
        out_dir = export_for_timm(args.checkpoint, args.dir, ema=not args.raw)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out_dir / 'model.safetensors'} and {out_dir / 'config.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
