"""`python -m vitrain.export`: a checkpoint that plain timm loads, as README shows."""

import json
import os
import re
import stat
import subprocess
import sys
import textwrap

import timm
import torch
from conftest import ROOT
from safetensors.torch import load_file

from vitrain.export import main as export_main
from vitrain.models import ViTClassifier


def readme_timm_call() -> str:
    """The Python block of README "Export to timm": the call users copy."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if "pretrained_cfg_overlay" in b]
    return block


def test_export_loads_in_plain_timm_with_the_lightning_modules_logits(ema_run, tmp_path):
    ckpt = ema_run[0] / "checkpoints" / "last.ckpt"
    assert export_main([str(ckpt), str(tmp_path / "export")]) == 0

    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert (config["architecture"], config["num_classes"]) == ("vit_tiny_patch16_224", 10)
    assert config["model_args"]["img_size"] == [32, 32] and config["model_args"]["embed_dim"] == 96
    pretrained = config["pretrained_cfg"]  # the run's eval preprocessing (conf/data/digits.yaml)
    assert pretrained["input_size"] == [3, 32, 32] and pretrained["num_classes"] == 10
    assert pretrained["mean"] == pretrained["std"] == [0.5, 0.5, 0.5]
    assert (pretrained["crop_pct"], pretrained["interpolation"]) == (1.0, "bicubic")

    # Lightning's own loading of the checkpoint: its state_dict holds the EMA weights.
    module = ViTClassifier.load_from_checkpoint(ckpt, map_location="cpu").eval()
    exported = load_file(tmp_path / "export" / "model.safetensors")
    state = module.model.state_dict()
    assert exported.keys() == state.keys()  # timm's names: no model. or _orig_mod. prefixes
    assert all(torch.equal(exported[k], state[k]) for k in state)

    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    torch.save(images, tmp_path / "images.pt")
    with torch.no_grad():
        expected = module(images)
    script = readme_timm_call() + textwrap.dedent(
        """
        import sys

        import torch

        with torch.no_grad():
            torch.save(model(torch.load("images.pt")), "logits.pt")
        print(transform.transforms[0], "vitrain" in sys.modules)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("False")  # plain timm: vitrain never imported
    assert "Resize(size=32, interpolation=bicubic" in result.stdout
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5, rtol=0)


def test_export_raw_weights(ema_run, tmp_path, capsys):
    ckpt = ema_run[0] / "checkpoints" / "last.ckpt"
    assert export_main([str(ckpt), str(tmp_path / "raw"), "--raw"]) == 0
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)["current_model_state"]
    exported = load_file(tmp_path / "raw" / "model.safetensors")
    assert all(torch.equal(exported[k], raw[f"model.{k}"]) for k in exported)
    assert "vitrain checkpoint, raw weights" in capsys.readouterr().out
    assert export_main([str(tmp_path / "raw" / "model.safetensors"), str(tmp_path / "x")]) == 2
    assert "is not a checkpoint of a vitrain run" in capsys.readouterr().err


def test_export_names_the_classes_in_index_order_as_timm_does(ema_run, tmp_path, capsys):
    ckpt = ema_run[0] / "checkpoints" / "last.ckpt"
    assert export_main([str(ckpt), str(tmp_path / "export")]) == 0
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    digits = [str(d) for d in range(10)]  # train/'s sorted class folders: index = position
    assert config["label_names"] == digits and "label_descriptions" not in config
    model = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True)
    assert model.pretrained_cfg["label_names"] == digits  # timm's own reading of them

    # A checkpoint written before runs recorded their class names: none to write, and it says so.
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    del checkpoint["datamodule_hyper_parameters"]["classes"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    capsys.readouterr()
    assert export_main([str(tmp_path / "old.ckpt"), str(tmp_path / "old")]) == 0
    assert "label_names" not in json.loads((tmp_path / "old" / "config.json").read_text())
    assert "no class names in it" in capsys.readouterr().out


def test_exported_files_get_the_mode_open_gives_a_new_file(ema_run, tmp_path):
    ckpt = ema_run[0] / "checkpoints" / "last.ckpt"
    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
        previous = os.umask(umask)
        try:
            assert export_main([str(ckpt), str(tmp_path / oct(umask))]) == 0
        finally:
            os.umask(previous)
        for name in ("model.safetensors", "config.json"):
            assert stat.S_IMODE((tmp_path / oct(umask) / name).stat().st_mode) == mode, name
