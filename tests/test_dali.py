"""data=imagenet_dali on DALI's CPU backend: batches like the ImageFolder loader's, sharding over
ranks, one short fit. Skipped, with the reason, where DALI is not installed or cannot run here."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import BARE_CPU, compose_config, run_cli, run_train
from hydra.errors import ConfigCompositionException
from PIL import Image

from vitrain.data import DaliDataModule, ImageFolderDataModule
from vitrain.data.dali import rand_augment_kwargs
from vitrain.errors import UserError
from vitrain.train import build_datamodule


def dali_unavailable() -> str | None:
    """Why DALI cannot run here (None: it can): not installed, or no CPU pipeline builds."""
    try:
        from nvidia.dali import fn, pipeline_def
    except ImportError as err:
        return f"NVIDIA DALI is not installed ({err}): pip install -e .[dali]"
    try:

        @pipeline_def(batch_size=2, num_threads=1, device_id=None)
        def probe():
            return fn.random.uniform(range=[0.0, 1.0])

        pipeline = probe()
        pipeline.build()
        pipeline.run()
    except Exception as err:  # noqa: BLE001 - any failure means: no CPU backend on this machine
        return f"DALI's CPU backend does not run here: {err}"
    return None


REASON = dali_unavailable()
if REASON:
    print(f"tests/test_dali.py: DALI tests skipped: {REASON}", file=sys.stderr)
needs_dali = pytest.mark.skipif(REASON is not None, reason=str(REASON))

CLASSES = ("ant", "bee", "cat")
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# RandomResizedCrop + flip: a one-colour image stays one colour, so files can be told apart.
PLAIN = {
    "scale": [0.08, 1.0],
    "ratio": [0.75, 1.3333333],
    "hflip": 0.5,
    "auto_augment": None,
    "re_prob": 0.0,
    "interpolation": "bicubic",
}
IMAGE_SIZE = 32


def write_jpeg_folder(root: Path, train_per_class: int, val_per_class: int) -> dict[str, int]:
    """Real JPEG files, each one colour whose red level names it: {split/class/stem: red level}."""
    reds, number = {}, 0
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                red = 5 + 10 * number
                number += 1
                path = folder / f"{name}_{i}.JPEG"
                Image.new("RGB", (48 + 8 * i, 40), (red, 90, 160)).save(path, quality=90)
                reds[f"{split}/{name}/{path.stem}"] = red
    assert red <= 250, "too many files for one red level each"
    return reds


def red_levels(images: torch.Tensor) -> list[int]:
    """Undo the normalisation; the mean red value of each one-colour image."""
    red = images[:, 0] * STD[0] + MEAN[0]
    return [round(float(v) * 255) for v in red.mean(dim=(1, 2))]


def identify(images: torch.Tensor, reds: dict[str, int]) -> list[str]:
    """The file each image came from: the one whose red level is nearest (levels are 10 apart)."""
    names = []
    for level in red_levels(images):
        name, red = min(reds.items(), key=lambda item: abs(item[1] - level))
        assert abs(red - level) <= 3, f"red {level} matches no file"
        names.append(name)
    return names


def datamodule(
    root: Path,
    batch_size: int,
    augment: dict = PLAIN,
    device: str = "cpu",
    num_classes: int = len(CLASSES),
    **kwargs,
) -> DaliDataModule:
    return DaliDataModule(
        root=str(root),
        batch_size=batch_size,
        num_workers=1,
        image_size=IMAGE_SIZE,
        num_classes=num_classes,
        augment=augment,
        eval_crop_pct=0.875,
        mean=MEAN,
        std=STD,
        device=device,
        **kwargs,
    )


def rank_trainer(rank: int, world: int, training: bool = False) -> SimpleNamespace:
    """What DaliDataModule reads from its Trainer: the rank, the world and the device."""
    return SimpleNamespace(
        global_rank=rank,
        world_size=world,
        num_devices=1,
        training=training,
        current_epoch=0,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )


@needs_dali
def test_batches_have_the_imagefolder_loaders_shape_dtype_range_and_labels(tmp_path):
    write_jpeg_folder(tmp_path, train_per_class=4, val_per_class=3)
    augment = {**PLAIN, "auto_augment": "rand-m9-mstd0.5-inc1"}  # the default recipe's RandAugment
    dali = datamodule(tmp_path, batch_size=4, augment=augment)
    dali.check()
    reference = ImageFolderDataModule(
        root=str(tmp_path),
        batch_size=4,
        num_workers=0,
        image_size=IMAGE_SIZE,
        num_classes=len(CLASSES),
        augment=augment,
        eval_crop_pct=0.875,
        mean=MEAN,
        std=STD,
        pin_memory=False,
        loader="pil",
    )
    reference.setup("fit")
    lowest = min((0 - m) / s for m, s in zip(MEAN, STD, strict=True))
    highest = max((1 - m) / s for m, s in zip(MEAN, STD, strict=True))
    for split in ("train", "val"):
        ours = list(getattr(dali, f"{split}_dataloader")())
        theirs = list(getattr(reference, f"{split}_dataloader")())
        assert [len(b.targets) for b in ours] == [
            len(b.targets) for b in theirs
        ]  # 12 / 4; 9 / 4 -> 4 4 1
        for (images, targets, bad_files), (ref_images, ref_targets, _) in zip(
            ours, theirs, strict=True
        ):
            assert images.shape == ref_images.shape == (len(targets), 3, IMAGE_SIZE, IMAGE_SIZE)
            assert images.dtype == ref_images.dtype == torch.float32
            assert targets.dtype == ref_targets.dtype == torch.int64
            assert bad_files == ()  # DALI cannot skip a file: it never replaces one
            assert lowest - 1e-4 <= images.min() and images.max() <= highest + 1e-4
            assert 0 <= targets.min() and targets.max() < len(CLASSES)
            if split == "val":  # the same files in the same order, the same centre crops
                assert torch.equal(targets, ref_targets)
                assert (images - ref_images).abs().max() < 0.05


@needs_dali
def test_two_val_shards_see_every_file_once_in_the_same_number_of_batches(tmp_path):
    reds = write_jpeg_folder(tmp_path, train_per_class=1, val_per_class=4)  # 12 val files
    val = {k: v for k, v in reds.items() if k.startswith("val/")}
    seen, batches = [], []
    for rank in (0, 1):
        dali = datamodule(tmp_path, batch_size=10)  # 5 per rank: batches of 5 and 1
        dali.trainer = rank_trainer(rank, world=2)
        loader = dali.val_dataloader()
        rank_batches = list(loader)
        assert len(rank_batches) == len(loader)
        batches.append([len(b.targets) for b in rank_batches])
        seen += [name for b in rank_batches for name in identify(b.images, val)]
        # the labels travel with their files
        for images, targets, _ in rank_batches:
            names = identify(images, val)
            assert [CLASSES[t] for t in targets.tolist()] == [n.split("/")[1] for n in names]
    assert batches == [[5, 1], [5, 1]]
    assert sorted(seen) == sorted(val)


@needs_dali
def test_an_odd_val_set_pads_like_distributed_sampler_and_never_gives_an_empty_batch(tmp_path):
    reds = write_jpeg_folder(tmp_path, train_per_class=1, val_per_class=3)  # 9 val files
    val = {k: v for k, v in reds.items() if k.startswith("val/")}
    seen, batches = [], []
    for rank in (0, 1):
        dali = datamodule(tmp_path, batch_size=8)  # 4 per rank: shards of 5 -> batches 4 and 1
        dali.trainer = rank_trainer(rank, world=2)
        rank_batches = list(dali.val_dataloader())
        batches.append([len(b.targets) for b in rank_batches])
        seen += [name for b in rank_batches for name in identify(b.images, val)]
    assert batches == [[4, 1], [4, 1]]
    assert set(seen) == set(val) and len(seen) == 10  # one file twice (fewer than the world size)


@needs_dali
def test_train_shards_give_floor_n_over_world_over_batch_distinct_files_reshuffled(tmp_path):
    reds = write_jpeg_folder(tmp_path, train_per_class=7, val_per_class=1)  # 21 train files
    train = {k: v for k, v in reds.items() if k.startswith("train/")}
    loaders, trainers = [], []
    for rank in (0, 1):
        dali = datamodule(tmp_path, batch_size=4, seed=3)  # 2 per rank
        dali.trainer = rank_trainer(rank, world=2, training=True)
        trainers.append(dali.trainer)
        loaders.append(dali.train_dataloader())
    epochs = []
    for epoch in (0, 1, 2, 1):
        per_rank = []
        for trainer, loader in zip(trainers, loaders, strict=True):
            trainer.current_epoch = epoch
            rank_batches = list(loader)
            assert len(loader) == len(rank_batches) == 21 // 2 // 2
            assert all(len(b.targets) == 2 for b in rank_batches)
            per_rank.append([name for b in rank_batches for name in identify(b.images, train)])
        epochs.append(per_rank)
        both = per_rank[0] + per_rank[1]
        assert len(set(both)) == len(both) == 20  # the ranks' shards never overlap
    assert epochs[0][0] != epochs[1][0] != epochs[2][0]  # a new order every epoch
    assert epochs[3] == epochs[1]  # seeded by the epoch: a resumed run sees the same order


@needs_dali
def test_random_crops_have_torchvisions_area_and_aspect_ratio_statistics(tmp_path):
    from nvidia.dali import fn, pipeline_def
    from torchvision.transforms import RandomResizedCrop

    photo = tmp_path / "photo.JPEG"
    Image.new("RGB", (500, 375), (120, 80, 40)).save(photo, quality=90)  # ImageNet's usual size

    @pipeline_def(batch_size=500, num_threads=1, device_id=None, seed=5)
    def crops():
        jpegs, _ = fn.readers.file(files=[str(photo)])
        return fn.decoders.image_random_crop(
            jpegs, device="cpu", random_area=PLAIN["scale"], random_aspect_ratio=PLAIN["ratio"],
            num_attempts=10,
        ).shape()  # fmt: skip

    pipeline = crops()
    pipeline.build()
    shapes = torch.cat([torch.as_tensor(pipeline.run()[0].as_array()) for _ in range(4)]).double()
    ours = {
        "area": shapes[:, 0] * shapes[:, 1] / (500 * 375),
        "log_ratio": (shapes[:, 1] / shapes[:, 0]).log(),
    }
    torch.manual_seed(5)
    image = torch.zeros(3, 375, 500)
    draw = RandomResizedCrop.get_params  # (top, left, height, width)
    boxes = [draw(image, PLAIN["scale"], PLAIN["ratio"])[2:] for _ in range(2000)]
    boxes = torch.tensor(boxes, dtype=torch.float64)
    theirs = {
        "area": boxes[:, 0] * boxes[:, 1] / (500 * 375),
        "log_ratio": (boxes[:, 1] / boxes[:, 0]).log(),
    }
    quantiles = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    for key in ("area", "log_ratio"):
        difference = (ours[key].quantile(quantiles) - theirs[key].quantile(quantiles)).abs()
        assert difference.max() < 0.04, (key, difference)


@needs_dali
def test_the_datamodule_alone_gives_the_benchmark_its_loader(tmp_path):
    """bench/loader.py builds the datamodule without a Trainer: one rank, this machine's device."""
    write_jpeg_folder(tmp_path, train_per_class=5, val_per_class=1)
    dali = datamodule(tmp_path, batch_size=4, threads=2)
    dali.check()
    loader = dali.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 15 // 4
    batch = batches[0]
    assert batch.images.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch.images.dtype == torch.float32 and batch.images.device.type == "cpu"
    assert batch.targets.dtype == torch.int64 and batch.bad_files == ()


@needs_dali
def test_random_erasing_applies_to_training_batches_on_the_device(tmp_path):
    write_jpeg_folder(tmp_path, train_per_class=4, val_per_class=1)
    dali = datamodule(tmp_path, batch_size=4, augment={**PLAIN, "re_prob": 1.0})
    dali.trainer = rank_trainer(0, world=1, training=True)
    batch = next(iter(dali.train_dataloader()))
    clean = batch.images.clone()
    erased = dali.on_after_batch_transfer(batch, 0).images
    # timm's defaults: one patch of 2% to 1/3 of each image, its pixels replaced by random values
    erased_fraction = (erased != clean).float().mean(dim=(1, 2, 3))
    assert ((0.01 < erased_fraction) & (erased_fraction < 0.4)).all()
    dali.trainer = rank_trainer(0, world=1, training=False)
    assert dali.on_after_batch_transfer(batch._replace(images=clean), 0).images is clean


@needs_dali
def test_an_unreadable_file_stops_with_the_check_command(tmp_path):
    write_jpeg_folder(tmp_path, train_per_class=2, val_per_class=2)
    (tmp_path / "val" / "bee" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" * 8)
    dali = datamodule(tmp_path, batch_size=8)
    with pytest.raises(UserError, match=r"DALI stopped reading .*vitrain\.data\.check"):
        list(dali.val_dataloader())


@needs_dali
def test_a_short_fit_with_data_imagenet_dali_on_cpu(tmp_path):
    write_jpeg_folder(tmp_path / "data", train_per_class=4, val_per_class=2)
    metrics = run_train(
        [
            "experiment=quickstart",
            "data=imagenet_dali",
            f"data.root={tmp_path / 'data'}",
            f"data.image_size={IMAGE_SIZE}",
            "data.num_classes=3",
            "data.batch_size=4",
            "data.threads=1",
            "trainer.max_epochs=1",
            *BARE_CPU,
        ],
        tmp_path / "run",
    )
    assert 0.0 <= metrics["val/acc1"] <= 1.0
    assert 0 < metrics["train/loss_epoch"] < 10
    (epoch,) = json.loads((tmp_path / "run" / "run_report.json").read_text())["epochs"]
    # 3 batches of 4: every training image once
    assert epoch["perf/images_per_s"] * epoch["perf/epoch_time_s"] == pytest.approx(12)


@needs_dali
@pytest.mark.slow
def test_ddp_on_two_cpu_processes_shards_odd_folders_without_hanging(tmp_path):
    write_jpeg_folder(tmp_path / "data", train_per_class=5, val_per_class=3)  # 15 train, 9 val
    result = run_cli(
        [
            "experiment=quickstart",
            "data=imagenet_dali",
            f"data.root={tmp_path / 'data'}",
            f"data.image_size={IMAGE_SIZE}",
            "data.num_classes=3",
            "data.batch_size=4",
            "data.threads=1",
            "strategy=ddp_cpu",
            "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false",
            "logger=csv",
            "callbacks=base",
            "hydra.run.dir=" + str(tmp_path / "run"),
        ],
        tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "run_report.json").read_text())
    assert report["config"]["devices"] == 2 and report["config"]["per_device_batch"] == 2
    for epoch in report["epochs"]:
        # 2 ranks x floor(15 / 2 / 2) = 3 batches x 2 images; the 15th image waits for another epoch
        assert epoch["perf/images_per_s"] * epoch["perf/epoch_time_s"] == pytest.approx(12)
        assert 0.0 <= epoch["val/acc1"] <= 1.0


def test_rand_augment_follows_timms_string():
    assert rand_augment_kwargs("rand-m9-mstd0.5-inc1") == {
        "n": 2,
        "m": 9,
        "num_magnitude_bins": 11,  # bin 9 of 0..10: timm's magnitude 9 / 10
        "monotonic_mag": True,
        "max_translate_rel": 0.45,
    }
    assert rand_augment_kwargs("rand-n3-m7-mmax20")["num_magnitude_bins"] == 21
    with pytest.raises(UserError, match=r"auto_augment=augmix-m5.*data=imagenet"):
        rand_augment_kwargs("augmix-m5")
    with pytest.raises(UserError, match=r"'w0' is not one of m, n, mstd, inc, mmax"):
        rand_augment_kwargs("rand-m9-w0")


@needs_dali
def test_settings_dali_cannot_honour_are_refused(tmp_path):
    write_jpeg_folder(tmp_path, train_per_class=1, val_per_class=1)
    refused = {
        r"data.device=tpu is not one of auto, gpu, cpu": {"device": "tpu"},
        r"auto_augment=original: .*data.augment.auto_augment=null": {
            "augment": {**PLAIN, "auto_augment": "original"}
        },
        r"data.num_classes=1000 but .*train has 3 classes: set data.num_classes=3": {
            "num_classes": 1000
        },
        r"train/train does not exist.* point data.root=/path/to/imagenet at a folder with": {
            "root": tmp_path / "train"
        },
    }
    for message, settings in refused.items():
        settings = {"root": tmp_path, "batch_size": 4, **settings}
        with pytest.raises(UserError, match=message):
            datamodule(**settings).check()
    dali = datamodule(tmp_path, batch_size=4, device="gpu")
    dali.trainer = rank_trainer(0, world=1)
    with pytest.raises(UserError, match=r"data.device=gpu but training does not run on a CUDA"):
        dali.val_dataloader()
    # What DALI cannot do is not in its config at all: the ImageFolder loader's keys are refused
    # when the config is composed, before anything runs.
    for key, value in (("on_bad_sample", "skip"), ("loader", "fast"), ("pin_memory", "true")):
        assert key not in compose_config(["data=imagenet_dali"]).data
        with pytest.raises(ConfigCompositionException, match=f"data.{key}"):
            compose_config(["data=imagenet_dali", f"data.{key}={value}"])


def test_without_dali_the_config_names_the_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali -> ImportError
    cfg = compose_config(["data=imagenet_dali", f"data.root={tmp_path}"], tmp_path)
    with pytest.raises(UserError, match=r"pip install -e \.\[dali\]"):
        build_datamodule(cfg)


def test_importing_vitrain_data_does_not_import_dali():
    code = "import sys, vitrain.data; print(any(m.startswith('nvidia.dali') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
