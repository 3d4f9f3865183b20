"""DeiT III's recipe (3-Augment, Simple Random Crop, BCE, LAMB, LayerScale), training sizes that
differ from the evaluation size or follow a schedule, and time to accuracy."""

import json
import math
import random

import numpy as np
import pytest
import torch
from conftest import TINY, compose_config, run_train
from lightning.pytorch import Callback
from PIL import Image
from timm.loss import BinaryCrossEntropy
from timm.optim import Lamb

from vitrain.data.decode_fast import FastSampleTransform
from vitrain.data.decode_pil import train_transform
from vitrain.data.epochs import Repeats
from vitrain.data.on_device import (
    BLUR,
    GRAY,
    SOLARIZE,
    DeviceAugment,
    apply_color,
    color_jitter,
    color_transform,
    three_augment,
)
from vitrain.data.resolution import ResolutionPlan
from vitrain.errors import UserError
from vitrain.models.recipe import training_loss
from vitrain.report import compare, to_markdown
from vitrain.report.run_report import time_to_accuracy
from vitrain.train import build_module

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
THREE_AUG = {
    "crop": "rrc",
    "scale": [1.0, 1.0],
    "ratio": [1.0, 1.0],
    "hflip": 0.0,
    "auto_augment": "3a",
    "color_jitter": None,
    "re_prob": 0.0,
    "interpolation": "bicubic",
}


def colourful(size: int = 32, seed: int = 0) -> Image.Image:
    """Saturated colour blocks with a bright and a dark half: every 3-Augment op shows."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize((size, size), Image.NEAREST)


def is_gray(image: torch.Tensor) -> bool:
    """(3, H, W) whose channels agree (to the rounding of a uint8 luma)."""
    return bool((image[0] - image[1]).abs().max() <= 1 and (image[1] - image[2]).abs().max() <= 1)


# --- 3-Augment and the Simple Random Crop, both loaders ------------------------------------
def test_three_augment_chooses_each_op_a_third_of_the_time_and_does_what_it_names():
    torch.manual_seed(0)
    original = torch.from_numpy(np.array(colourful())).permute(2, 0, 1).float()
    pixels = original[None].repeat(3000, 1, 1, 1)
    choice = three_augment(pixels)  # solarisation and blur in place; grayscale a colour matrix
    counts = torch.bincount(choice, minlength=3).tolist()
    # Binomial(3000, 1/3): sd 26; 5 sd of room.
    assert all(abs(c - 1000) < 130 for c in counts), counts
    a, b = color_transform(pixels, choice == GRAY, None)
    out = apply_color(pixels, a, b)
    assert out.shape == pixels.shape and 0 <= out.min() and out.max() <= 255 + 1e-3
    gray, solar, blur = (out[choice == k] for k in (GRAY, SOLARIZE, BLUR))
    assert all(is_gray(image) for image in gray[:50])
    luma = (original * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(dim=0)
    torch.testing.assert_close(gray[0][0], luma)  # PIL's convert("L") weights
    flipped = torch.where(original >= 128, 255 - original, original)
    assert torch.equal(solar[0], flipped)  # solarised at 128, PIL's threshold
    # a blur keeps the mean and smooths the blocks' edges: less edge energy, more so on average
    assert (blur.mean(dim=(1, 2, 3)) - original.mean()).abs().max() < 2.0
    energy = (blur.diff(dim=-1) ** 2).mean(dim=(1, 2, 3))
    sharp = (original.diff(dim=-1) ** 2).mean()
    assert (energy <= sharp + 1e-3).all() and energy.mean() < 0.8 * sharp


def test_the_fused_jitter_is_torchvisions_colorjitter_in_its_order():
    """One image, one order, one set of factors: the composed colour matrix gives what
    torchvision's three functional ops give in that order (on values that never clamp)."""
    import torchvision.transforms.v2.functional as TF

    torch.manual_seed(3)
    image = torch.rand(1, 3, 16, 16) * 120 + 60  # mid-range: no clamping in between
    factors = torch.tensor([[1.2, 0.8, 1.25]])  # brightness, contrast, saturation
    order = [2, 0, 1]  # saturation, brightness, contrast
    ops = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation}
    expected = image / 255
    for op in order:
        expected = ops[op](expected, float(factors[0, op]))
    real_rand, real_uniform = torch.rand, torch.Tensor.uniform_
    try:  # the factors and the order color_transform draws, fixed to the ones above
        torch.Tensor.uniform_ = lambda self, *a: self.copy_(factors)
        torch.rand = lambda *a, **k: torch.tensor([[0.5, 0.9, 0.1]])  # argsort -> [2, 0, 1]
        a, b = color_transform(image, None, 0.3)
    finally:
        torch.rand, torch.Tensor.uniform_ = real_rand, real_uniform
    torch.testing.assert_close(apply_color(image, a, b) / 255, expected, atol=1e-4, rtol=1e-4)


def test_color_jitter_factors_stay_within_the_strength():
    torch.manual_seed(0)
    gray = torch.full((500, 3, 8, 8), 100.0)
    out = color_jitter(gray, 0.3)
    # A gray image: contrast and saturation leave it be, brightness scales it by 0.7-1.3.
    ratio = out.mean(dim=(1, 2, 3)) / 100.0
    assert 0.7 - 1e-4 <= ratio.min() and ratio.max() <= 1.3 + 1e-4
    assert ratio.std() > 0.1  # spread over the range, not one factor


@pytest.mark.parametrize("loader", ["fast", "pil"])
def test_both_loaders_make_a_third_of_the_images_gray(loader, tmp_path):
    """The same statistics from the fast path (uint8 crops, 3-Augment on the device) and the pil
    path (timm's 3a policy on PIL images), on the same image, with the range they deliver."""
    image = colourful()
    path = tmp_path / "a.png"
    image.save(path)
    random.seed(0), torch.manual_seed(0), np.random.seed(0)
    if loader == "fast":
        crops = torch.stack(
            [FastSampleTransform("train", 32, THREE_AUG, 1.0, "bicubic")(path) for _ in range(600)]
        )
        assert crops.dtype == torch.uint8 and crops.shape == (600, 3, 32, 32)
        out = DeviceAugment(MEAN, STD, THREE_AUG)(crops, training=True)
    else:
        transform = train_transform(32, THREE_AUG, MEAN, STD)
        out = torch.stack([transform(image) for _ in range(600)])
    assert out.dtype == torch.float32 and out.shape == (600, 3, 32, 32)
    lowest = float(((0 - torch.tensor(MEAN)) / torch.tensor(STD)).min())
    highest = float(((1 - torch.tensor(MEAN)) / torch.tensor(STD)).max())
    assert lowest - 1e-3 <= out.min() and out.max() <= highest + 1e-3
    pixels = out * torch.tensor(STD).view(3, 1, 1) * 255 + torch.tensor(MEAN).view(3, 1, 1) * 255
    gray = sum(is_gray(p.round()) for p in pixels) / 600
    assert abs(gray - 1 / 3) < 0.07, gray  # Binomial(600, 1/3): sd 0.019


@pytest.mark.parametrize("loader", ["fast", "pil"])
def test_simple_random_crop_offsets_cover_the_padded_image_uniformly(loader, tmp_path):
    """SRC: shorter side to the size, 4 px of reflection, a random crop. A horizontal ramp (each
    column its own value) shows where each crop starts: every offset, about equally often."""
    ramp = np.tile(np.arange(0, 240, 5, dtype=np.uint8), (32, 1))  # 48 columns, 32 rows
    image = Image.fromarray(np.stack([ramp] * 3, axis=-1))
    path = tmp_path / "ramp.png"
    image.save(path)
    augment = {**THREE_AUG, "crop": "src", "auto_augment": None}
    torch.manual_seed(0)
    if loader == "fast":
        transform = FastSampleTransform("train", 32, augment, 1.0, "nearest")
        crops = [transform(path) for _ in range(900)]
    else:
        pil = train_transform(32, {**augment, "interpolation": "nearest"}, (0.0,) * 3, (1.0,) * 3)
        crops = [(pil(image) * 255).round().to(torch.uint8) for _ in range(900)]
    assert all(c.shape == (3, 32, 32) for c in crops)
    # The ramp's row 16 (away from the vertical padding), columns 4 to 27 of the crop: the
    # crop's left edge is found by matching it against the padded ramp.
    padded = np.pad(ramp[16], 4, mode="reflect")
    offsets = []
    for crop in crops:
        row = crop[0, 16].numpy()
        matches = [x for x in range(len(padded) - 31) if np.array_equal(padded[x : x + 32], row)]
        assert matches, "a crop that is not a window of the padded image"
        offsets.append(matches[0])
    counts = np.bincount(offsets, minlength=48 + 8 - 32 + 1)
    assert len(counts) == 25 and (counts > 0).all()  # every offset of 0..24
    assert counts.max() < 3 * counts.mean()


def test_dali_refuses_deit3_augmentations_by_name(tmp_path):
    from vitrain.data import DaliDataModule

    cfg = compose_config(["data=imagenet_dali", f"data.root={tmp_path}", "recipe=deit3"])
    args = {k: v for k, v in cfg.data.items() if k != "_target_"}
    module = DaliDataModule(**args)
    with pytest.raises(UserError, match="data.augment.crop=src, auto_augment=3a and color_jitter"):
        from vitrain.data.augmentation import check_augment

        check_augment(module.augment, "dali")


# --- the loss, the optimizer, LayerScale -----------------------------------------------------
def test_bce_with_mixup_counts_every_mixed_class_as_a_positive():
    recipe = compose_config(["recipe=deit3", "experiment=quickstart"]).recipe
    recipe = {**recipe, "mixup_alpha": 0.8, "cutmix_alpha": 0.0, "mixup_prob": 1.0}
    mixup, criterion = training_loss(recipe, num_classes=10)
    assert isinstance(criterion, BinaryCrossEntropy) and criterion.target_threshold == 0.0
    torch.manual_seed(0)
    images, targets = torch.randn(8, 3, 4, 4), torch.arange(8)
    _, soft = mixup(images, targets)
    assert ((soft > 0).sum(dim=1) == 2).all()  # mixup pairs each image with another
    logits = torch.randn(8, 10)
    binary = (soft > 0).float()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, binary)
    torch.testing.assert_close(criterion(logits, soft), expected)


def test_deit3_trains_with_lamb_layerscale_and_an_unscaled_learning_rate(tmp_path):
    class Optimizer(Callback):
        def on_train_start(self, trainer, pl_module):
            self.optimizer = trainer.optimizers[0]
            self.lr = self.optimizer.param_groups[0]["initial_lr"]
            self.gammas = [b.ls1.gamma.detach().clone() for b in pl_module.model.blocks]
            self.sampler = trainer.train_dataloader.sampler

    probe = Optimizer()
    metrics = run_train(
        [*TINY, "recipe=deit3", "recipe.base_lr=3e-3", "trainer.max_epochs=1",
         "trainer.limit_train_batches=3", "trainer.limit_val_batches=1"],
        tmp_path,
        [probe],
    )  # fmt: skip
    assert isinstance(probe.optimizer, Lamb)
    assert probe.lr == pytest.approx(3e-3)  # lr_scaling=none: not x 64 / 512
    assert all(torch.allclose(g, torch.full_like(g, 1e-4)) for g in probe.gammas)
    assert math.isfinite(metrics["train/loss_epoch"])
    assert probe.sampler.repeats == Repeats(3, "dataset")  # DeiT's repeated augmentation


def test_deit3_compares_on_synthetic_batches_too(tmp_path):
    """experiment=speed recipe=deit3: the recipe's input-pipeline settings change nothing there;
    its loss, optimiser and mixing still run."""
    metrics = run_train(
        [*TINY, "data=synthetic", "recipe=deit3", "trainer.max_epochs=1", "data.image_size=32",
         "data.num_classes=10", "data.batch_size=16", "data.train_batches=2",
         "data.val_batches=1"],
        tmp_path,
    )  # fmt: skip
    assert math.isfinite(metrics["train/loss_epoch"])


# --- resolutions -----------------------------------------------------------------------------
def test_a_schedule_ramps_like_ffcv_in_steps_and_scale_tokens_keeps_the_tokens():
    plan = ResolutionPlan(224, 224, {"start": 160, "end": 192, "start_epoch": 65,
                                     "end_epoch": 76, "step": 32})  # fmt: skip
    assert [plan.size(e) for e in (0, 65, 66, 70, 71, 76, 87)] == [
        160,
        160,
        160,
        160,
        192,
        192,
        192,
    ]
    assert plan.sizes(88) == [160, 192] and plan.varies and plan.other_sizes
    tokens = ResolutionPlan(32, 32, {"start": 24, "end": 32, "start_epoch": 0, "end_epoch": 2,
                                     "step": 4}, "scale_tokens")  # fmt: skip
    assert [tokens.global_batch(64, e, world_size=2, even=True) for e in (0, 1, 2)] == [112, 80, 64]
    assert not ResolutionPlan(224, 224).other_sizes and ResolutionPlan(224, 192).other_sizes
    with pytest.raises(UserError, match="data.batch_size_schedule=tokens is not one of"):
        ResolutionPlan(224, 224, None, "tokens")
    with pytest.raises(UserError, match="needs end_epoch, step too"):
        ResolutionPlan(224, 224, {"start": 160, "end": 192, "start_epoch": 0})


class Sizes(Callback):
    """The image size, the batch and the learning rate of each training epoch."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[int, int, float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.seen.setdefault(trainer.current_epoch, (batch.images.shape[-1],
                                                     batch.images.shape[0], lr))  # fmt: skip


def test_the_schedule_changes_the_size_at_its_epochs_and_the_report_says_so(tmp_path):
    probe = Sizes()
    schedule = "{start: 24, end: 32, start_epoch: 0, end_epoch: 2, step: 4}"
    run_train(
        [*TINY, "trainer.max_epochs=3", "trainer.limit_train_batches=3",
         "trainer.limit_val_batches=1", f"data.resolution_schedule={schedule}",
         "data.batch_size_schedule=scale_tokens", "recipe.warmup_epochs=0",
         "recipe.min_lr=1e-3"],
        tmp_path,
        [probe],
    )  # fmt: skip
    sizes = [probe.seen[e][0] for e in range(3)]
    batches = [probe.seen[e][1] for e in range(3)]
    assert sizes == [24, 28, 32]
    assert batches == [112, 82, 64]  # 64 x (32 / size)^2, even: as many tokens per batch
    report = json.loads((tmp_path / "run_report.json").read_text())
    assert [e["perf/image_size"] for e in report["epochs"]] == [24, 28, 32]
    assert report["summary"]["image_size"] == 32
    assert (
        "perf/resize_step_s" in report["epochs"][1]
        and "perf/resize_step_s" not in (report["epochs"][0])
    )
    # The learning rate follows the batch (linear scaling; the schedule is flat here: 8e-3 x 64 /
    # 512 = 1e-3 down to a min_lr of 1e-3).
    lrs = [probe.seen[e][2] for e in range(3)]
    assert lrs == pytest.approx([1e-3 * 112 / 64, 1e-3 * 82 / 64, 1e-3])


class LoaderWorkers(Callback):
    """Each epoch's training and validation loader, and the pids of their worker processes."""

    def __init__(self) -> None:
        self.train: list[tuple[int, list[int]]] = []
        self.val: list[tuple[int, list[int]]] = []

    @staticmethod
    def workers(loader) -> tuple[int, list[int]]:
        iterator = loader._iterator  # torch's persistent workers live on the loader's iterator
        return id(loader), sorted(worker.pid for worker in iterator._workers)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.train.append(self.workers(trainer.train_dataloader))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and not trainer.sanity_checking:
            self.val.append(self.workers(trainer.val_dataloaders))


def test_the_loaders_and_their_workers_change_only_when_the_size_does(tmp_path):
    probe, sizes = LoaderWorkers(), Sizes()
    schedule = "{start: 24, end: 32, start_epoch: 1, end_epoch: 2, step: 8}"  # 24, 24, 32, 32
    run_train(
        [*TINY, "trainer.max_epochs=4", "trainer.limit_train_batches=2",
         "trainer.limit_val_batches=1", f"data.resolution_schedule={schedule}",
         "data.num_workers=1", "recipe.warmup_epochs=0"],
        tmp_path,
        [probe, sizes],
    )  # fmt: skip
    assert [sizes.seen[e][0] for e in range(4)] == [24, 24, 32, 32]
    train = probe.train
    assert train[0] == train[1] and train[2] == train[3]  # the same loader, the same workers
    assert train[1][0] != train[2][0] and not set(train[1][1]) & set(train[2][1])
    assert len(probe.val) == 4 and all(val == probe.val[0] for val in probe.val)


def test_the_model_takes_the_training_sizes_when_they_differ(tmp_path):
    cfg = compose_config([*TINY, "data.train_image_size=24"], tmp_path)
    module = build_module(cfg)
    assert module.hparams.model["dynamic_img_size"] is True
    assert module(torch.zeros(2, 3, 24, 24)).shape == module(torch.zeros(2, 3, 32, 32)).shape
    assert build_module(compose_config(TINY, tmp_path)).hparams.model["dynamic_img_size"] is False
    with pytest.raises(UserError, match=r"training sizes \[30\] .* model.patch_size=4"):
        run_train([*TINY, "data.train_image_size=30", "trainer.fast_dev_run=true"], tmp_path)


# --- time to accuracy ------------------------------------------------------------------------
def epochs_with(accuracies: list[float]) -> list[dict]:
    return [
        {"epoch": e, "val/acc1": acc, "perf/epoch_time_s": 10.0, "elapsed_s": 12.0 * (e + 1),
         "images_seen": 1000.0 * (e + 1)}
        for e, acc in enumerate(accuracies)
    ]  # fmt: skip


def test_time_to_accuracy_is_the_first_epoch_that_reached_each_target():
    reached = time_to_accuracy(epochs_with([0.3, 0.55, 0.52, 0.81]), [0.8, 0.5, 0.9])
    assert list(reached) == ["0.5", "0.8", "0.9"]
    assert reached["0.5"] == {"epoch": 1, "wall_s": 24.0, "train_s": 20.0, "images": 2000.0}
    assert reached["0.8"]["epoch"] == 3 and reached["0.8"]["train_s"] == 40.0
    assert reached["0.9"] is None


def test_the_report_has_a_time_to_column_per_target(tmp_path):
    from report_fixtures import write_fake_report

    for name, accs in (("slow", [0.3, 0.4, 0.6]), ("fast", [0.55, 0.7, 0.8])):
        reached = time_to_accuracy(epochs_with(accs), [0.5, 0.8])
        write_fake_report(tmp_path / name, config={"tags": [name]}, time_to_acc=reached)
    from vitrain.report import load_reports

    table = to_markdown(compare(load_reports([tmp_path])))
    header = table.splitlines()[0]
    assert "time to 50 % (s)" in header and "time to 80 % (s)" in header
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:4]}
    assert rows["fast"].count("| 12.0 |") == 1 and "| 36.0 |" in rows["fast"]
    assert "| 36.0 |" in rows["slow"] and "| – |" in rows["slow"]
    assert "not reached" in table


def test_the_recipes_bench_tables_each_arm(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "recipes.py"), "--arms", "deit,schedule",
         "--seeds", "0", "--target", "0.0", "--json", str(tmp_path / "runs.json"), "--set",
         "trainer.max_epochs=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
         "data.resolution_schedule={start: 24, end: 32, start_epoch: 0, end_epoch: 1, step: 4}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| deit", "| sch"))]
    assert len(rows) == 2 and "not reached" not in rows[0]  # 0 % is reached at epoch 0
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert runs["deit"][0]["epoch"] == 0 and runs["schedule"][0]["wall_s"] > 0
