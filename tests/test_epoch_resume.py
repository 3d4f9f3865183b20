"""A run stopped mid-epoch and resumed sees every sample of that epoch exactly once (the
ImageFolder and the shard loaders; DDP: tests/test_resilience.py, the stop signals)."""

import json
import logging
import os
import signal
from collections import Counter

import pytest
from conftest import TINY, compose_config, run_train
from hydra.utils import instantiate
from lightning.pytorch import Callback
from sample_recorder import COLOUR_RUN, SampleRecorder, samples_of_epoch
from timm.data.distributed_sampler import RepeatAugSampler

from vitrain.data.epochs import EpochSampler, Repeats, ResumableLoader
from vitrain.errors import Preempted, UserError

# 48 training images: 6 batches per epoch
COLOURS = [*TINY, *COLOUR_RUN, "data.num_workers=2", "trainer.max_epochs=2"]


class SignalAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


# A resolution schedule rebuilds the training loader every epoch (epoch 1 trains at 16 px).
GROWING = "data.resolution_schedule={start: 8, end: 16, start_epoch: 0, end_epoch: 1, step: 8}"


@pytest.mark.parametrize(
    ("data", "folder", "more"),
    [
        ("imagenet", "folder", []),
        ("imagenet_shards", "shards", []),
        ("imagenet", "folder", [GROWING]),
        ("imagenet_shards", "shards", [GROWING]),
    ],
    ids=["folder", "shards", "folder-resized", "shards-resized"],
)
def test_a_run_stopped_mid_epoch_and_resumed_sees_each_sample_of_that_epoch_once(
    data, folder, more, colours, tmp_path
):
    overrides = [*COLOURS, f"data={data}", f"data.root={colours / folder}", *more]
    samples = tmp_path / "samples"
    with pytest.raises(Preempted):  # after 2 of epoch 1's 6 batches
        run_train(overrides, tmp_path / "run", [SampleRecorder(samples), SignalAtStep(8)])
    assert len(samples_of_epoch(samples, 1)) == 2 * 8
    run_train(overrides, tmp_path / "run", [SampleRecorder(samples)])
    assert sorted(samples_of_epoch(samples, 1)) == list(range(48))  # each once
    assert sorted(samples_of_epoch(samples, 0)) == list(range(48))
    # The interrupted epoch's figures, and images and time to accuracy, count the batches
    # trained before the stop too.
    epochs = json.loads((tmp_path / "run" / "run_report.json").read_text())["epochs"]
    assert [e["images_seen"] for e in epochs] == [48, 96]
    assert [round(e["perf/epoch_time_s"] * e["perf/images_per_s"]) for e in epochs] == [48, 48]
    assert epochs[1]["elapsed_s"] > epochs[0]["elapsed_s"]


def sampler_loader(rank: int, world: int, batch: int, resume=None) -> ResumableLoader:
    dataset = list(range(40))
    sampler = EpochSampler(dataset, world_size=world, rank=rank, seed=3)
    return ResumableLoader(
        dataset,
        source=sampler,
        epoch_of=lambda: 1,
        world_size=world,
        resume=lambda: resume,
        sampler=sampler,
        batch_size=batch,
        drop_last=True,
    )


def epoch_of(loader: ResumableLoader, stop: int | None = None) -> list[int]:
    seen = []
    for number, batch in enumerate(loader, start=1):
        seen += batch.tolist()
        if number == stop:
            break
    return seen


def test_every_rank_continues_its_own_order_from_one_position():
    whole = {rank: epoch_of(sampler_loader(rank, 2, 4)) for rank in (0, 1)}
    assert sorted(whole[0] + whole[1]) == list(range(40))  # the ranks' parts are disjoint
    cut = {rank: sampler_loader(rank, 2, 4) for rank in (0, 1)}
    first = {rank: epoch_of(loader, stop=2) for rank, loader in cut.items()}
    position = cut[0].position()  # rank 0's, as in the checkpoint
    assert position == cut[1].position() and position.batches == 2
    rest = {rank: epoch_of(sampler_loader(rank, 2, 4, resume=position)) for rank in (0, 1)}
    for rank in (0, 1):
        assert first[rank] + rest[rank] == whole[rank]  # the same order, each sample once
    # The next epoch starts at its beginning again.
    assert sampler_loader(0, 2, 4).position() is None


def test_a_resume_with_other_settings_starts_the_epoch_over_and_says_so(caplog):
    cut = sampler_loader(0, 2, 4)
    epoch_of(cut, stop=2)
    with caplog.at_level(logging.WARNING, logger="vitrain"):
        again = epoch_of(sampler_loader(0, 1, 4, resume=cut.position()))
    assert sorted(again) == list(range(40))
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "world_size 2 then, 1 now" in warning and "seen twice" in warning


def sampler_parts(length: int, world: int, repeats: Repeats, epoch: int = 0) -> list[list[int]]:
    parts = []
    for rank in range(world):
        sampler = EpochSampler(
            list(range(length)), world_size=world, rank=rank, seed=0, repeats=repeats
        )
        sampler.set_epoch(epoch)
        parts.append(list(sampler))
    return parts


@pytest.mark.parametrize("world", [1, 2, 3])
def test_repeated_aug_puts_every_sample_n_times_in_an_epoch_split_exactly(world):
    parts = sampler_parts(40, world, Repeats(3, "repeated"))
    assert {len(part) for part in parts} == {120 // world}  # equal parts: no rank waits
    assert Counter(i for part in parts for i in part) == Counter({i: 3 for i in range(40)})
    if world == 3:  # the repeats of a sample go to consecutive ranks, as in DeiT's RASampler
        assert all(sorted(part) == list(range(40)) for part in parts)


@pytest.mark.parametrize(("length", "world"), [(40, 1), (40, 2), (41, 2), (40, 3), (7, 4)])
@pytest.mark.parametrize("epoch", [0, 1])
def test_repeated_aug_of_deits_epoch_length_is_timms_repeat_aug_sampler(length, world, epoch):
    ours = sampler_parts(length, world, Repeats(3, "dataset"), epoch)
    theirs = []
    for rank in range(world):
        sampler = RepeatAugSampler(
            list(range(length)), num_replicas=world, rank=rank, num_repeats=3, selected_round=0
        )
        sampler.set_epoch(epoch)
        theirs.append(list(sampler))
    assert ours == theirs
    assert {len(part) for part in ours} == {-(-length // world)}  # as long as without repeats


def test_repeated_aug_refuses_what_it_cannot_do_by_name():
    with pytest.raises(UserError, match=r"data.repeated_aug=0 must be a whole number"):
        Repeats(0)
    with pytest.raises(UserError, match=r"data.repeated_aug_epoch=twice is not one of"):
        Repeats(3, "twice")
    assert compose_config(["recipe=deit3"]).data.repeated_aug == 3  # DeiT III's
    cfg = compose_config(["data=imagenet_dali", "+data.repeated_aug=3"])
    with pytest.raises(UserError, match=r"data.repeated_aug=3: DALI's reader has no repeated"):
        instantiate(cfg.data).check()


@pytest.mark.parametrize(
    ("data", "folder"), [("imagenet", "folder"), ("imagenet_shards", "shards")]
)
def test_a_fit_with_repeated_aug_trains_on_each_sample_n_times_and_resumes_exactly(
    data, folder, colours, tmp_path
):
    overrides = [
        *COLOURS,
        f"data={data}",
        f"data.root={colours / folder}",
        "data.repeated_aug=3",
        "data.repeated_aug_epoch=repeated",
    ]
    samples = tmp_path / "samples"
    with pytest.raises(Preempted):  # epoch 0 has 18 batches; stop in epoch 1, after 4 of them
        run_train(overrides, tmp_path / "run", [SampleRecorder(samples), SignalAtStep(22)])
    run_train(overrides, tmp_path / "run", [SampleRecorder(samples)])
    for epoch in (0, 1):
        assert Counter(samples_of_epoch(samples, epoch)) == Counter({i: 3 for i in range(48)})
