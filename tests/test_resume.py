"""Resuming a run: from the newest readable checkpoint, into the same history, changing nothing
when it cannot go ahead."""

import csv
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, run_train

from vitrain.errors import UserError

SHORT = [*TINY, "trainer.limit_train_batches=6", "trainer.limit_val_batches=2"]
STEPS = 6  # per epoch


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory) -> Path:
    """A run of 3 epochs in two attempts (1 epoch, then resumed to 3), kept as `pristine/`."""
    root = tmp_path_factory.mktemp("three_epochs")
    run_train([*SHORT, "trainer.max_epochs=1"], root / "run")
    run_train([*SHORT, "trainer.max_epochs=3"], root / "run")
    shutil.copytree(root / "run", root / "pristine")
    return root


def copy_run(three_epochs: Path, tmp_path: Path) -> Path:
    """The run as the fixture left it, at its own path: checkpoints name their directory, and
    Lightning's ModelCheckpoint forgets its best files in a run directory that has moved."""
    run = three_epochs / "run"
    shutil.rmtree(run)
    shutil.copytree(three_epochs / "pristine", run)
    return run


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def best_checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("epoch*.ckpt"))


def file_hashes(run: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_an_unreadable_last_checkpoint_is_moved_aside_and_the_newest_readable_used(
    three_epochs, tmp_path, caplog
):
    run = copy_run(three_epochs, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    (best,) = best_checkpoints(run)
    cut_in_half(last)
    cut = last.read_bytes()
    # What a kill -9 during a save leaves.
    (run / "checkpoints" / ".last.ckpt.tmp-4242").write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.INFO, logger="vitrain"):
        run_train([*SHORT, "trainer.max_epochs=4"], run)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{last} cannot be read" in warning and best in warning
    (moved,) = (run / "checkpoints" / "unreadable").rglob("last.ckpt")
    assert moved.read_bytes() == cut  # moved, not deleted
    assert step_of(last) == 4 * STEPS  # resumed from the best (epoch 2) and trained epoch 3
    assert not list((run / "checkpoints").glob(".*tmp*"))


def test_no_readable_checkpoint_is_one_error_naming_them_and_changes_nothing(
    three_epochs, tmp_path
):
    run = copy_run(three_epochs, tmp_path)
    (best,) = best_checkpoints(run)
    cut_in_half(run / "checkpoints" / "last.ckpt")
    (run / "checkpoints" / best).write_bytes(os.urandom(4096))
    before = file_hashes(run)
    with pytest.raises(UserError) as err:
        run_train([*SHORT, "trainer.max_epochs=4"], run)
    message = str(err.value)
    assert "last.ckpt" in message and best in message and "resume=never" in message
    assert "\n" not in message
    assert file_hashes(run) == before  # csv/metrics.csv and run_report.json included


@pytest.mark.parametrize(
    ("override", "tensor", "setting"),
    [
        ("data.image_size=64", "model.pos_embed has shape (1, 65, 96)", "data.image_size=32"),
        ("model.kwargs.depth=2", "model.blocks.2", "model.kwargs.depth=4"),
    ],
)
def test_a_checkpoint_of_another_model_names_the_tensor_and_the_setting(
    override, tensor, setting, three_epochs, tmp_path
):
    run = copy_run(three_epochs, tmp_path)
    before = file_hashes(run)
    with pytest.raises(UserError) as err:
        run_train([*SHORT, "trainer.max_epochs=4", override], run)
    message = str(err.value)
    assert tensor in message and f"resume with {setting}" in message, message
    assert file_hashes(run) == before


def test_a_checkpoint_of_other_classes_is_one_error_naming_them(three_epochs, tmp_path):
    """The same number of classes, one class folder renamed: the shapes fit, the labels not."""
    run = copy_run(three_epochs, tmp_path)
    digits = tmp_path / "digits"
    shutil.copytree(ROOT / "data" / "digits", digits)
    for split in ("train", "val"):
        (digits / split / "9").rename(digits / split / "nine")
    before = file_hashes(run)
    with pytest.raises(UserError) as err:
        run_train([*SHORT, "trainer.max_epochs=4", f"data.root={digits}"], run)
    message = str(err.value)
    assert "was trained on other classes than data.root's" in message, message
    assert "only in the checkpoint: 9; only in data.root: nine" in message, message
    assert file_hashes(run) == before


def test_a_garbage_ckpt_path_is_one_error(three_epochs, tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(1000))
    with pytest.raises(UserError, match=f"ckpt_path={garbage} cannot be read"):
        run_train([*SHORT, f"ckpt_path={garbage}"], tmp_path / "run")


def test_checkpoints_the_resumed_state_does_not_know_are_moved_aside(three_epochs, tmp_path):
    """A better-scoring best checkpoint that last.ckpt does not know (left by an abandoned
    timeline) must not stay beside the resumed run's own."""
    run = copy_run(three_epochs, tmp_path)
    (best,) = best_checkpoints(run)
    stale = "epoch002-acc1_0.9999.ckpt"
    shutil.copy2(run / "checkpoints" / best, run / "checkpoints" / stale)
    os.utime(run / "checkpoints" / "last.ckpt")  # still the newest: resume=auto takes it
    run_train([*SHORT, "trainer.max_epochs=4"], run)
    assert step_of(run / "checkpoints" / "last.ckpt") == 4 * STEPS
    assert stale not in best_checkpoints(run) and len(best_checkpoints(run)) == 1
    assert [p.name for p in (run / "checkpoints" / "superseded").rglob("*.ckpt")] == [stale]


def test_a_resumed_run_keeps_the_history_of_every_attempt(three_epochs):
    """The fixture's run: attempt 1 trained epoch 0, attempt 2 resumed and trained epochs 1-2."""
    run = three_epochs / "pristine"
    with open(run / "csv" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    epochs = {(row["attempt"], row["epoch"]) for row in rows if row.get("perf/epoch_time_s")}
    assert epochs == {("1", "0"), ("2", "1"), ("2", "2")}  # attempt 1's rows are kept
    report = json.loads((run / "run_report.json").read_text())
    assert [e["epoch"] for e in report["epochs"]] == [0, 1, 2]
    assert report["summary"]["epochs_run"] == 3 and report["summary"]["attempts"] == 2
    first, second = report["attempts"]
    assert [first["attempt"], second["attempt"]] == [1, 2]
    assert first["status"] == second["status"] == "finished"
    assert first["resumed_from"] is None and first["start_step"] == 0
    assert second["resumed_from"].endswith("last.ckpt") and second["start_step"] == STEPS
    assert first["started_at"] <= second["started_at"] and first["end_step"] == STEPS
    # Time and images to accuracy count on across the attempts, not from the resume.
    seen = [e["images_seen"] for e in report["epochs"]]
    assert seen == [seen[0] * (n + 1) for n in range(3)]
    elapsed = [e["elapsed_s"] for e in report["epochs"]]
    assert elapsed == sorted(elapsed) and elapsed[1] - elapsed[0] < second["wall_time_s"]
