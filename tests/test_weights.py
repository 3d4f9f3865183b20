"""Starting from weights (model.init_from) and fine-tuning with layer decay: real tiny runs."""

import argparse
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from conftest import BARE_CPU, TINY, compose_config, run_train
from lightning.pytorch import Callback
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from vitrain.errors import UserError
from vitrain.models import create_vit

MICRO = dict(embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0)  # conf/model/vit_micro.yaml


def micro(img_size: int = 32, num_classes: int = 10, **init) -> torch.nn.Module:
    return create_vit("vit_tiny_patch16_224", 4, img_size, num_classes, kwargs=MICRO, **init)


def model_state(checkpoint: dict, key: str) -> dict[str, torch.Tensor]:
    """The timm model's tensors in a vitrain checkpoint's `key` (state_dict or the raw weights)."""
    return {k.removeprefix("model."): v for k, v in checkpoint[key].items()}


def digits_subset(classes: range, dest: Path) -> Path:
    """The quickstart's digits ImageFolder with only `classes`: another dataset, fewer classes."""
    source = Path(compose_config(TINY).data.root)
    for split in ("train", "val"):
        for c in classes:
            shutil.copytree(source / split / str(c), dest / split / str(c))
    return dest


class RecordStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.step, self.epoch = trainer.global_step, trainer.current_epoch
        self.optimizer_state = dict(trainer.optimizers[0].state)
        self.tensors = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


def test_init_from_a_checkpoint_into_other_classes_and_image_size(quickstart_run, tmp_path, capsys):
    """5 of the 10 digits at 40 px (10 x 10 patches), from the quickstart: 10 classes, 32 px."""
    ckpt = quickstart_run / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    subset = digits_subset(range(5), tmp_path / "digits5")
    start = RecordStart()
    run_train(
        [
            *TINY,
            f"model.init_from={ckpt}",
            f"data.root={subset}",
            "data.num_classes=5",
            "data.image_size=40",
            # digits' facts, read as a plain ImageFolder (data=digits would write all 10 digits)
            "data._target_=vitrain.data.ImageFolderDataModule",
            "~data.val_fraction",
            "~data.split_seed",
            "trainer.max_epochs=2",
        ],
        tmp_path / "run",
        [start],
    )
    printed = capsys.readouterr().out
    assert f"model.init_from={ckpt}: vitrain checkpoint, weights (it has no EMA" in printed
    assert "  loaded          54 tensors" in printed
    assert "  re-initialised  head.weight, head.bias (10 classes in the file, 5 here)" in printed
    assert "  resampled       pos_embed [1, 65, 96] -> [1, 101, 96]" in printed
    assert "  missing         none\n  unexpected      none" in printed

    # A new run: step 0, a fresh optimizer; the weights are the file's, resampled by timm.
    assert (start.step, start.epoch, start.optimizer_state) == (0, 0, {})
    trained = model_state(saved, "state_dict")
    for key in ("blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.bias", "norm.weight", "cls_token"):
        assert torch.equal(start.tensors[key], trained[key])
    expected_pos = resample_abs_pos_embed(trained["pos_embed"], [10, 10], num_prefix_tokens=1)
    assert torch.allclose(start.tensors["pos_embed"], expected_pos)
    assert start.tensors["head.weight"].shape == (5, 96)

    report = json.loads((tmp_path / "run" / "run_report.json").read_text())
    epochs = report["epochs"]
    assert [e["global_step"] for e in epochs] == [11, 22]  # 720 images / 64 a step, from step 0
    # The trained features carry over: well above chance (0.2) within 2 epochs.
    assert max(e["val/acc1"] for e in epochs) >= 0.45
    assert epochs[-1]["train/loss_epoch"] < epochs[0]["train/loss_epoch"] - 0.2

    # The fine-tuned checkpoint records where its weights started and loads without that file.
    from vitrain.models import ViTClassifier

    tuned = tmp_path / "run" / "checkpoints" / "last.ckpt"
    moved = ckpt.with_name("moved-away.ckpt")
    ckpt.rename(moved)
    try:
        module = ViTClassifier.load_from_checkpoint(tuned, map_location="cpu")
    finally:
        moved.rename(ckpt)
    assert module.hparams.initialized_from == str(ckpt) and not module.hparams.model["init_from"]
    assert module.model.head.weight.shape == (5, 96)


def test_init_from_ema_or_raw_weights_of_a_checkpoint(ema_run, tmp_path):
    ckpt = ema_run[0] / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    ema, raw = model_state(saved, "state_dict"), model_state(saved, "current_model_state")
    assert not torch.equal(ema["blocks.0.attn.qkv.weight"], raw["blocks.0.attn.qkv.weight"])
    for init_from_ema, expected in ((True, ema), (False, raw)):
        state = micro(init_from=str(ckpt), init_from_ema=init_from_ema).state_dict()
        assert all(torch.equal(state[k], expected[k]) for k in state)
    # A checkpoint of a model wrapped by torch.compile(model) names its tensors model._orig_mod.*
    compiled = {**saved, "state_dict": {f"model._orig_mod.{k}": v for k, v in ema.items()}}
    del compiled["current_model_state"]
    torch.save(compiled, tmp_path / "compiled.ckpt")
    state = micro(init_from=str(tmp_path / "compiled.ckpt")).state_dict()
    assert all(torch.equal(state[k], ema[k]) for k in state)


def test_init_from_timm_state_dicts(tmp_path, capsys):
    """timm's own model saved as safetensors, a DeiT-style .pth and a DDP-prefixed .pt."""
    torch.manual_seed(0)
    reference = timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, **MICRO
    )
    state = reference.state_dict()
    save_file(state, tmp_path / "model.safetensors")
    # DeiT's main.py saves {"model": ..., "args": Namespace}; timm's train.py adds state_dict_ema
    torch.save(
        {"model": state, "epoch": 299, "args": argparse.Namespace(lr=5e-4)}, tmp_path / "deit.pth"
    )
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    for name in ("model.safetensors", "deit.pth", "ddp.pt"):
        loaded = micro(init_from=str(tmp_path / name)).state_dict()
        assert all(torch.equal(loaded[k], state[k]) for k in state), name
    printed = capsys.readouterr().out
    assert f"model.init_from={tmp_path / 'deit.pth'}: state dict 'model'" in printed
    assert printed.count("  loaded          56 tensors") == 3


def test_a_tensor_of_another_shape_is_an_error_naming_it(tmp_path):
    narrower = timm.create_model(
        "vit_tiny_patch16_224",
        num_classes=10,
        img_size=32,
        patch_size=4,
        **{**MICRO, "embed_dim": 64, "num_heads": 4},
    )
    save_file(narrower.state_dict(), tmp_path / "narrow.safetensors")
    with pytest.raises(UserError) as err:
        micro(init_from=str(tmp_path / "narrow.safetensors"))
    message = str(err.value)
    assert "cls_token is [1, 1, 64] in the file but [1, 1, 96] in vit_tiny_patch16_224" in message
    assert "model.kwargs.embed_dim" in message and "\n" not in message
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(UserError, match="cannot be read as weights"):
        micro(init_from=str(tmp_path / "notes.txt"))
    with pytest.raises(UserError, match="is not a file"):
        micro(init_from=str(tmp_path / "missing.ckpt"))


class RecordOptimizer(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        names = {id(p): n for n, p in pl_module.model.named_parameters()}
        self.groups = [
            {
                "names": [names[id(p)] for p in g["params"]],
                "lr_scale": g.get("lr_scale", 1.0),
                "weight_decay": g["weight_decay"],
                "lr": g["lr"],
            }
            for g in trainer.optimizers[0].param_groups
        ]


def test_layer_decay_gives_timms_parameter_groups(tmp_path):
    record = RecordOptimizer()
    run_train(
        [
            "experiment=speed",
            "model=vit_micro",
            "data.image_size=32",
            "data.num_classes=10",
            "data.batch_size=8",
            "data.train_batches=1",
            "trainer.max_epochs=1",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
            "logger=none",
            "recipe.layer_decay=0.65",
        ],
        tmp_path,
        [record],
    )
    by_name = {n: g for g in record.groups for n in g["names"]}
    # timm's param_groups_layer_decay over the ViT's group_matcher: the embeddings are layer 0,
    # block i layer i + 1 (the final norm goes with the last block), the head layer 5; layer i
    # learns at 0.65^(5 - i) x lr.
    expected_layer = {"pos_embed": 0, "cls_token": 0, "patch_embed.proj.weight": 0}
    expected_layer |= {f"blocks.{i}.attn.qkv.weight": 1 + i for i in range(4)}
    expected_layer |= {"norm.weight": 4, "head.weight": 5, "head.bias": 5}
    for name, layer in expected_layer.items():
        assert by_name[name]["lr_scale"] == pytest.approx(0.65 ** (5 - layer)), name
    head_lr = by_name["head.weight"]["lr"]
    for g in record.groups:  # timm's scheduler applies lr_scale at every step
        assert g["lr"] == pytest.approx(head_lr * g["lr_scale"])
    # vitrain's decay rules hold: none on norms, biases, position embedding and class token
    no_decay = {n for n, g in by_name.items() if g["weight_decay"] == 0.0}
    assert {"pos_embed", "cls_token", "norm.weight", "head.bias", "blocks.0.norm1.bias"} <= no_decay
    assert by_name["blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    assert by_name["head.weight"]["weight_decay"] == 0.05
    assert len(record.groups) == 12  # 6 layers x (decay, no decay)


def test_finetune_experiment_composes_the_documented_recipe():
    cfg = compose_config(["experiment=finetune", "model=vit_b16", "model.init_from=w.ckpt"])
    recipe = cfg.recipe
    assert (recipe.base_lr, recipe.layer_decay, recipe.weight_decay) == (2e-5, 0.85, 1e-8)
    assert (recipe.warmup_epochs, recipe.label_smoothing, recipe.mixup_alpha) == (1, 0.1, 0.8)
    assert recipe.for_trained_weights and cfg.trainer.max_epochs == 30
    assert (cfg.data.augment.re_prob, cfg.data.eval_crop_pct) == (0.0, 1.0)
    assert cfg.data.augment.auto_augment == "rand-m9-mstd0.5-inc1"


def test_finetune_recipe_without_weights_and_unset_values_are_errors(tmp_path):
    with pytest.raises(UserError, match=r"give them with model\.init_from=<vitrain checkpoint"):
        run_train([*TINY, "recipe=finetune"], tmp_path)
    with pytest.raises(
        UserError, match=r"^model\.name must be given for this run: add model\.name"
    ):
        run_train([*TINY, "model=vit"], tmp_path)


def test_finetune_experiment_on_synthetic_batches_starts_from_the_file(tmp_path):
    """experiment=finetune data=synthetic (as experiment=speed measures a recipe): its input
    settings (eval crop, random erasing) change nothing there; the weights are the file's."""
    torch.manual_seed(0)
    state = micro().state_dict()
    save_file(state, tmp_path / "model.safetensors")
    start = RecordStart()
    run_train(
        [
            "experiment=finetune",
            "model=vit_micro",
            f"model.init_from={tmp_path / 'model.safetensors'}",
            "data=synthetic",
            "data.image_size=32",
            "data.num_classes=10",
            "data.batch_size=16",
            "data.train_batches=2",
            "data.val_batches=1",
            "trainer.max_epochs=1",
            *BARE_CPU,
        ],
        tmp_path / "run",
        [start],
    )
    assert start.step == 0 and all(torch.equal(start.tensors[k], state[k]) for k in state)
