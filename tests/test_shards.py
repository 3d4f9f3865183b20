"""Tar shards: the converter's output, the exact DDP/worker split, URLs, errors and real fits."""

import functools
import hashlib
import http.server
import importlib.util
import io
import json
import os
import re
import shutil
import tarfile
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config, run_cli, run_train
from lightning.pytorch.callbacks import Callback
from PIL import Image
from torch.utils.data import DataLoader

from vitrain.data.bad_samples import BadSampleError, BadSamplePolicy
from vitrain.data.batch import collate_samples
from vitrain.data.epochs import Repeats, ResumableLoader
from vitrain.data.shards import ShardDataset, ShardsDataModule, read_index, worker_segments
from vitrain.data.write_shards import convert, main
from vitrain.errors import UserError

CLASSES = ("ant", "bee", "cat")
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 3  # 24 train samples (2 ranks x 3 batches of 4), 9 val
SHARD_SIZE = 5


def write_jpeg_folder(root: Path, bad: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """Real JPEG files of a few sizes around 64 px; returns {split/class/stem: file bytes}."""
    files = {}
    for s, (split, count) in enumerate((("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS))):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                image = Image.new("RGB", (56 + 4 * i, 64), (80 * c, 20 * i, 100 + 50 * s))
                image.paste((255, 255, 255), (i, i, 20 + i, 30))
                path = folder / f"{name}_{i}.JPEG"
                image.save(path, format="JPEG", quality=90)
                files[f"{split}/{name}/{name}_{i}"] = path.read_bytes()
    for relative, data in (bad or {}).items():
        (root / relative).write_bytes(data)
    return files


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("shards")
    files = write_jpeg_folder(root / "folder")
    assert main([str(root / "folder"), str(root / "shards"), f"--shard-size={SHARD_SIZE}"]) == 0
    return root / "shards", files


def digest(data: bytes) -> torch.Tensor:
    """A stand-in transform that identifies the sample: the file's md5 as 16 uint8 values."""
    return torch.frombuffer(bytearray(hashlib.md5(data).digest()), dtype=torch.uint8)


def digests_to_keys(files: dict[str, bytes]) -> dict[bytes, str]:
    return {hashlib.md5(data).digest(): key for key, data in files.items()}


def split_dataset(shard_root: Path | str, split: str, **kwargs) -> ShardDataset:
    url = f"{shard_root}/{split}"
    policy = BadSamplePolicy("skip", repair="re-convert")
    return ShardDataset(url, read_index(url), digest, policy, shuffle=split == "train", **kwargs)


def keys_read(dataset: ShardDataset, rank: int, world: int, batch: int, drop_last: bool, workers=2):
    """{(rank, worker): [sample keys]} of one epoch, worker by worker (no processes)."""
    read = {}
    for worker in range(workers):
        dataset.configure(rank, world, batch, drop_last)
        read[rank, worker] = [s["__key__"] for s in dataset.raw_samples(worker, workers)]
    return read


def test_converter_writes_index_and_original_jpeg_bytes(shards):
    shard_root, files = shards
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        index = json.loads((shard_root / split / "index.json").read_text())
        total = per_class * len(CLASSES)
        assert index["classes"] == list(CLASSES) and index["num_samples"] == total
        sizes = [SHARD_SIZE] * (total // SHARD_SIZE) + ([total % SHARD_SIZE] if total % 5 else [])
        assert [s["num_samples"] for s in index["shards"]] == sizes
        assert [s["name"] for s in index["shards"]] == [
            f"{split}-{i:06d}.tar" for i in range(len(sizes))
        ]
        members = {}
        for shard in index["shards"]:
            with tarfile.open(shard_root / split / shard["name"]) as tar:
                names = tar.getnames()
                assert len(names) == 2 * shard["num_samples"]  # image + class, nothing else
                members.update({n: tar.extractfile(n).read() for n in names})
        expected = {k: v for k, v in files.items() if k.startswith(split + "/")}
        for key, data in expected.items():
            name = key.removeprefix(split + "/")
            assert members[f"{name}.jpeg"] == data  # the original bytes, not re-encoded
            assert members[f"{name}.cls"] == str(CLASSES.index(name.split("/")[0])).encode()
        assert len(members) == 2 * len(expected)
    # Classes are mixed before sharding: the first shard is not a single class.
    first = read_index(str(shard_root / "train"))["shards"][0]["name"]
    with tarfile.open(shard_root / "train" / first) as tar:
        assert len({n.split("/")[0] for n in tar.getnames()}) > 1


@pytest.mark.parametrize(
    ("counts", "world", "workers", "batch"),
    [([5, 5, 5, 5, 4], 2, 2, 4), ([7, 1, 4], 3, 2, 2), ([10] * 8, 4, 3, 5), ([3], 1, 4, 1)],
)
@pytest.mark.parametrize("epoch", [0, 1])
def test_ranks_and_workers_read_every_sample_exactly_once(counts, world, workers, batch, epoch):
    assert sum(counts) % (world * batch) == 0
    read = Counter()
    per_rank = Counter()
    for rank in range(world):
        for worker in range(workers):
            segments = worker_segments(
                counts,
                rank=rank,
                world_size=world,
                worker=worker,
                num_workers=workers,
                batch_size=batch,
                drop_last=True,
                epoch=epoch,
                seed=7,
                shuffle=True,
            )
            for s in segments:
                read.update((s.shard, i) for i in range(s.start, s.stop))
                per_rank[rank] += s.stop - s.start
    assert read == Counter({(shard, i): 1 for shard, n in enumerate(counts) for i in range(n)})
    assert set(per_rank.values()) == {sum(counts) // world}


@pytest.mark.parametrize("epoch_length", ["repeated", "dataset"])
@pytest.mark.parametrize(("world", "workers"), [(1, 1), (2, 2), (3, 2)])
def test_repeated_aug_reads_each_sample_n_times_split_exactly(shards, epoch_length, world, workers):
    """24 samples x 3 repeats: 72 positions (repeated) or the first 24 of them (dataset)."""
    dataset = split_dataset(shards[0], "train", seed=1, repeats=Repeats(3, epoch_length))
    reads = [keys_read(dataset, rank, world, 4, True, workers) for rank in range(world)]
    per_rank = [sum(len(keys) for keys in r.values()) for r in reads]
    positions = 72 if epoch_length == "repeated" else 24
    assert per_rank == [len(dataset)] * world == [positions // world // 4 * 4] * world
    counts = Counter(key for r in reads for keys in r.values() for key in keys)
    if epoch_length == "repeated" and 72 % (world * 4) == 0:
        assert counts == Counter({key: 3 for key in counts}) and len(counts) == 24
    else:  # the first positions of the epoch's sequence: whole repeats, but the last
        assert sorted(counts.values())[1:] == [3] * (len(counts) - 1)


def test_a_remainder_is_padded_with_the_first_samples_like_distributed_sampler():
    counts, world = [5, 4], 2  # 9 samples: 5 per rank, one sample read twice
    read = Counter()
    for rank in range(world):
        for s in worker_segments(
            counts, rank=rank, world_size=world, worker=0, num_workers=1, batch_size=2,
            drop_last=False,
        ):  # fmt: skip
            read.update((s.shard, i) for i in range(s.start, s.stop))
    assert sum(read.values()) == 10
    assert read[0, 0] == 2 and all(n == 1 for key, n in read.items() if key != (0, 0))


def test_training_drops_each_rank_partial_batch_and_ranks_stay_equal(shards):
    dataset = split_dataset(shards[0], "train")
    # 24 samples, 2 ranks, batch 5: 12 each, 2 full batches each, 2 samples per rank unread
    reads = [keys_read(dataset, rank, 2, 5, drop_last=True) for rank in (0, 1)]
    per_rank = [sum(len(keys) for keys in r.values()) for r in reads]
    assert per_rank == [10, 10] and len(dataset) == 10
    everything = [k for r in reads for keys in r.values() for k in keys]
    assert len(set(everything)) == 20
    # each worker reads whole batches: 1 each
    assert sorted(len(keys) for r in reads for keys in r.values()) == [5, 5, 5, 5]


def test_a_real_dataloader_with_two_workers_per_rank_yields_every_sample_once(shards):
    shard_root, files = shards
    keys_of = digests_to_keys(files)
    seen = {}
    batches = {}
    for rank in (0, 1):
        dataset = split_dataset(shard_root, "train")
        dataset.configure(rank, 2, 4, drop_last=True)
        loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_samples)
        rank_batches = list(loader)
        batches[rank] = len(rank_batches)
        seen[rank] = [keys_of[bytes(d.tolist())] for b in rank_batches for d in b.images]
        assert all(b.bad_files == () for b in rank_batches)
        assert len(loader) == batches[rank]
    assert batches == {0: 3, 1: 3}
    everything = seen[0] + seen[1]
    assert sorted(everything) == sorted(k for k in files if k.startswith("train/"))


@pytest.mark.parametrize("stop", [3, 5])  # in the workers' first turn, and in the last one
def test_a_resumed_epoch_continues_each_rank_and_worker_where_it_stopped(shards, stop):
    """24 samples, 2 ranks, batches of 2: 6 batches per rank over 4 workers (2, 2, 1, 1)."""
    shard_root, files = shards
    keys_of = digests_to_keys(files)

    def epoch(rank: int, resume=None, stop=None) -> tuple[list[str], object]:
        dataset = split_dataset(shard_root, "train", seed=5)
        dataset.configure(rank, 2, 2, drop_last=True)
        loader = ResumableLoader(
            dataset,
            source=dataset,
            epoch_of=lambda: 1,
            world_size=2,
            resume=lambda: resume,
            batch_size=2,
            num_workers=4,
            collate_fn=collate_samples,
        )
        keys = []
        for number, batch in enumerate(loader, start=1):
            keys += [keys_of[bytes(d.tolist())] for d in batch.images]
            if number == stop:
                break
        return keys, loader.position()

    for rank in (0, 1):
        whole, _ = epoch(rank)
        first, position = epoch(rank, stop=stop)
        rest, _ = epoch(rank, resume=position)
        assert len(whole) == 12 and first + rest == whole  # the same order, each sample once


def test_shuffling_changes_with_the_epoch_but_not_the_samples(shards):
    dataset = split_dataset(shards[0], "train", seed=3)
    orders = []
    for epoch in (0, 1, 0):
        dataset.start(epoch, batches=0, batch_size=4)
        orders.append(keys_read(dataset, 0, 2, 4, True) | keys_read(dataset, 1, 2, 4, True))
    flat = [[k for keys in o.values() for k in keys] for o in orders]
    assert flat[0] != flat[1] and flat[0] == flat[2]  # per epoch, reproducible
    assert sorted(flat[0]) == sorted(flat[1]) and len(set(flat[0])) == 24
    assert orders[0][0, 0] != orders[1][0, 0]  # not merely the same samples elsewhere


@pytest.fixture
def http_server(shards):
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(shards[0])
    )  # fmt: skip
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_path_a_file_url_and_an_http_url_read_the_same_samples(shards, http_server):
    reads = []
    for root in (str(shards[0]), f"file://{shards[0]}", http_server):
        dataset = split_dataset(root, "val")
        reads.append(keys_read(dataset, 0, 1, 4, drop_last=False, workers=1)[0, 0])
    assert reads[0] == reads[1] == reads[2]
    assert len(reads[0]) == 9


def datamodule(root, **overrides) -> ShardsDataModule:
    cfg = compose_config(["data=imagenet_shards", f"data.root={root}", "data.num_classes=3"])
    args = {k: v for k, v in cfg.data.items() if k != "_target_"} | overrides
    return ShardsDataModule(**args)


def test_errors_name_the_value_and_the_fix(shards, tmp_path):
    with pytest.raises(UserError, match=r"no shard index at .*nowhere/train/index.json.*shard"):
        datamodule(tmp_path / "nowhere").check()
    with pytest.raises(UserError, match=r"cannot open nope://bucket/train/index.json.*s3fs"):
        datamodule("nope://bucket").check()
    with pytest.raises(UserError, match=r"data.num_classes=1000 .* 3 classes: set data.num_"):
        datamodule(shards[0], num_classes=1000).check()
    with pytest.raises(UserError, match="data.shuffle_buffer=0 must be a positive integer"):
        datamodule(shards[0], shuffle_buffer=0)
    datamodule(shards[0]).check()  # the good one passes


def test_the_index_names_the_classes_and_validation_alone_reads_val(shards, tmp_path):
    module = datamodule(shards[0])
    module.check()
    assert module.hparams["classes"] == list(CLASSES)  # train/'s index: every checkpoint's
    shutil.copytree(shards[0] / "val", tmp_path / "val")  # no train/
    datamodule(tmp_path, classes=list(CLASSES)).check("validate")
    with pytest.raises(UserError, match=r"\(only in data.classes: cow; only in val: ant\)"):
        datamodule(tmp_path, classes=["bee", "cat", "cow"]).check("validate")
    with pytest.raises(UserError, match=r"train/index.json.* ckpt_path records no class names"):
        datamodule(tmp_path).check("validate")


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_s3_without_s3fs_says_what_to_install():
    with pytest.raises(UserError, match=r"cannot open s3://bucket/in/train/index.json .*s3fs"):
        datamodule("s3://bucket/in").check()


def test_config_shares_the_imagenet_settings():
    shards_cfg = compose_config(["data=imagenet_shards"]).data
    imagenet = compose_config(["data=imagenet"]).data
    assert shards_cfg._target_ == "vitrain.data.ShardsDataModule"
    assert shards_cfg.root.endswith("/imagenet-shards")
    for key in set(imagenet) - {"_target_", "root"}:
        assert shards_cfg[key] == imagenet[key], key


def test_bad_samples_are_replaced_counted_or_fatal(tmp_path):
    truncated = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(truncated, format="JPEG")
    write_jpeg_folder(tmp_path / "folder", {"val/bee/broken.JPEG": truncated.getvalue()[:200]})
    convert(tmp_path / "folder", tmp_path / "shards", shard_size=4)
    module = datamodule(tmp_path / "shards", image_size=32, num_workers=0, batch_size=4)
    module.setup()
    val = module.datasets["val"]
    val.configure(0, 1, 4, drop_last=False)
    samples = list(val)
    assert len(samples) == 10  # the bad one is replaced: the planned count holds
    named = [name for *_, replaced in samples for name in replaced]
    assert len(named) == 1
    assert re.fullmatch(rf"{tmp_path}/shards/val/val-\d{{6}}\.tar#bee/broken", named[0])
    module = datamodule(tmp_path / "shards", image_size=32, on_bad_sample="error")
    module.setup()
    module.datasets["val"].configure(0, 1, 4, drop_last=False)
    with pytest.raises(BadSampleError, match=r"cannot read .*#bee/broken.*on_bad_sample=skip"):
        list(module.datasets["val"])


TESTS_ON_PATH = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
FIT = [
    "experiment=quickstart",
    "data=imagenet_shards",
    "data.image_size=32",
    "data.num_classes=3",
    "data.batch_size=8",
    "data.num_workers=2",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "logger=none",
]


@pytest.mark.parametrize("loader", ["fast", "pil"])
def test_a_short_fit_on_the_shards(loader, shards, tmp_path):
    overrides = [*FIT, f"data.root={shards[0]}", f"data.loader={loader}", "callbacks=base"]
    metrics = run_train(overrides, tmp_path)
    assert 0.0 <= metrics["val/acc1"] <= 1.0
    assert 0 < metrics["train/loss_epoch"] < 10
    (epoch,) = json.loads((tmp_path / "run_report.json").read_text())["epochs"]
    # every training image once (3 batches of 8)
    assert epoch["perf/images_per_s"] * epoch["perf/epoch_time_s"] == pytest.approx(24)


class ShardKeyRecorder(Callback):
    """Records, per rank, every sample key its DataLoader workers read and its batch count."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.batches = self.images = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        # After the datamodule's setup, before anything iterates the loader: persistent workers
        # keep the dataset as it was when they started.
        dataset = trainer.datamodule.datasets["train"]
        dataset.raw_samples = RecordKeys(dataset, self.out_dir, trainer.global_rank)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        self.images += len(batch.targets)

    def on_train_end(self, trainer, pl_module) -> None:
        record = {"batches": self.batches, "images": self.images}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class RecordKeys:
    """Wraps a ShardDataset's raw_samples: appends each key a worker reads to a file of its own."""

    def __init__(self, dataset: ShardDataset, out_dir: Path, rank: int) -> None:
        self.raw_samples, self.dataset = dataset.raw_samples, dataset
        self.out_dir, self.rank = out_dir, rank

    def __call__(self, worker: int, num_workers: int):
        name = f"keys-epoch{self.dataset.epoch}-rank{self.rank}-worker{worker}.txt"
        path = self.out_dir / name
        with path.open("a") as log:
            for sample in self.raw_samples(worker, num_workers):
                log.write(sample["__key__"] + "\n")
                yield sample


@pytest.mark.slow
def test_ddp_on_two_processes_reads_every_sample_once_with_equal_batches(shards, tmp_path):
    record = tmp_path / "record"
    record.mkdir()
    result = run_cli(
        [
            *FIT,
            f"data.root={shards[0]}",
            "strategy=ddp_cpu",
            "callbacks=base",
            "+callbacks.keys._target_=test_shards.ShardKeyRecorder",
            f"+callbacks.keys.out_dir={record}",
            "trainer.max_epochs=2",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
        env={"PYTHONPATH": TESTS_ON_PATH},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    # 2 epochs x 24 samples / 2 ranks / 4 per batch: the same batch count on both ranks
    assert ranks == [{"batches": 6, "images": 24}] * 2
    keys = {path.stem: path.read_text().split() for path in record.glob("keys-*.txt")}
    assert sorted(keys) == sorted(
        f"keys-epoch{e}-rank{r}-worker{w}" for e in (0, 1) for r in (0, 1) for w in (0, 1)
    )
    every_sample = sorted(f"{c}/{c}_{i}" for c in CLASSES for i in range(TRAIN_PER_CLASS))
    orders = []
    for e in (0, 1):
        epoch = {(r, w): keys[f"keys-epoch{e}-rank{r}-worker{w}"] for r in (0, 1) for w in (0, 1)}
        assert sorted(k for ks in epoch.values() for k in ks) == every_sample  # each once
        assert [sum(len(epoch[r, w]) for w in (0, 1)) for r in (0, 1)] == [12, 12]
        orders.append(epoch)
    assert orders[0] != orders[1]  # set_epoch reached the persistent workers: a new shuffle


def test_converter_errors_name_the_folder(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert f"{tmp_path}/missing/train does not exist" in capsys.readouterr().err
    write_jpeg_folder(tmp_path / "folder")
    (tmp_path / "folder" / "val" / "cat").rename(tmp_path / "folder" / "val" / "cow")
    assert main([str(tmp_path / "folder"), str(tmp_path / "out")]) == 2
    differ = "different class folders (only in train: cat; only in val: cow)"
    assert differ in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # checked before anything is written
    assert main([str(tmp_path / "folder"), str(tmp_path / "out"), "--shard-size=0"]) == 2
    assert "--shard-size=0 must be a positive number" in capsys.readouterr().err
