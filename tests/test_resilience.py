"""Runs survive preemption, bad data and bad settings: nothing lost, every error clear."""

import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, run_train
from ddp_ranks import DdpRun
from lightning.pytorch import Callback
from PIL import Image
from sample_recorder import COLOUR_RUN, samples_of_epoch

from vitrain.checkpointing import AtomicCheckpointIO
from vitrain.data.check import main as check_main
from vitrain.errors import Preempted, UserError
from vitrain.faults import NonFiniteLossError
from vitrain.secrets import redact

SHORT = [*TINY, "trainer.limit_train_batches=6", "trainer.limit_val_batches=2"]


class SignalAtStep(Callback):
    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def run_with(callback: Callback, overrides: list[str], output_dir: Path) -> dict:
    return run_train(overrides, output_dir, callbacks=[callback])


def all_finite(ckpt: dict) -> bool:
    return all(
        torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()
    )


def last_step(output_dir: Path) -> int:
    ckpt = torch.load(
        output_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    return ckpt["global_step"]


# --- preemption and resume ----------------------------------------------------------------
def test_sigterm_mid_epoch_saves_and_resume_ends_at_the_uninterrupted_step(tmp_path):
    overrides = [*SHORT, "trainer.max_epochs=3"]
    run_train(overrides, tmp_path / "whole")
    whole_steps = last_step(tmp_path / "whole")
    assert whole_steps == 3 * 6

    with pytest.raises(Preempted, match="Resume with the same command") as stopped:
        run_with(SignalAtStep(8, signal.SIGUSR1), overrides, tmp_path / "cut")  # in epoch 1
    assert stopped.value.exit_code == 143  # SLURM's warning signal ends like SIGTERM
    assert last_step(tmp_path / "cut") == 8  # saved at the end of the batch that got it

    run_train(overrides, tmp_path / "cut")  # resume=auto finds checkpoints/last.ckpt
    assert last_step(tmp_path / "cut") == whole_steps
    report = json.loads((tmp_path / "cut" / "run_report.json").read_text())
    assert [a["status"] for a in report["attempts"]] == ["preempted", "finished"]
    assert [a["start_step"] for a in report["attempts"]] == [0, 8]
    assert [e["epoch"] for e in report["epochs"]] == [0, 1, 2]  # epoch 1 ends in attempt 2


# Stop signals under DDP: SIGTERM/SIGINT/SIGUSR1 to one rank or to all stop every rank at the same
# batch, after one save. tests/preemption_loop.py repeats this 20 times per case (not in CI).
STOP_BOUND_S = 30  # from the signal to the exit of the last rank, on a loaded 2-core machine
# 48 one-colour images numbered by their colour (sample_recorder): 6 steps per epoch on 2 ranks.
DDP_COLOURS = [*TINY, *COLOUR_RUN, "strategy=ddp_cpu", "data.num_workers=1"]


def ddp_colour_run(data: str, colours: Path, tmp_path: Path, max_epochs: int) -> list[str]:
    """train.py's arguments: DDP on the colour folder (data=imagenet) or its shards, each
    rank recording its batches' samples in tmp_path/samples."""
    root = colours / ("shards" if data == "imagenet_shards" else "folder")
    return [
        *DDP_COLOURS,
        f"data={data}",
        f"data.root={root}",
        f"trainer.max_epochs={max_epochs}",
        "+callbacks.recorder._target_=sample_recorder.SampleRecorder",
        f"+callbacks.recorder.out_dir={tmp_path / 'samples'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]


def ddp_env(workdir: Path) -> dict[str, str]:
    """train.py's environment, with tests/ importable (probe callbacks) and logs under workdir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_API")}
    path = [str(ROOT / "tests"), *filter(None, [env.get("PYTHONPATH")])]  # sample_recorder
    return {**env, "PYTHONPATH": os.pathsep.join(path), "VITRAIN_LOG_DIR": str(workdir / "logs")}


def signal_ranks_after_epoch_0(run: DdpRun, run_dir: Path, target: str, signum: int) -> float:
    """Wait for epoch 0's checkpoint, then signal `target` (rank0, rank1, all); the time sent."""
    ranks = run.ranks()
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert last.exists(), run.stderr()
    time.sleep(0.5)
    sent = time.time()
    for rank in (0, 1) if target == "all" else (int(target[-1]),):
        os.kill(ranks[rank], signum)
    return sent


def test_resume_never_starts_fresh_beside_an_existing_last_checkpoint(tmp_path):
    run_train([*SHORT, "trainer.max_epochs=2"], tmp_path)
    assert last_step(tmp_path) == 12
    # Lightning resumes from "last" by itself when fit(ckpt_path=None) has an
    # OnExceptionCheckpoint callback: then this would train nothing and keep step 12.
    run_train([*SHORT, "trainer.max_epochs=1", "resume=never"], tmp_path)
    assert last_step(tmp_path) == 6


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "signum", "exit_code", "data"),
    [
        ("rank1", signal.SIGTERM, 143, "imagenet"),
        ("rank0", signal.SIGUSR1, 143, "imagenet_shards"),
        ("all", signal.SIGINT, 130, "imagenet"),
    ],
)
def test_stop_signal_to_any_ddp_rank_saves_once_every_rank_exits_and_the_epoch_resumes(
    target, signum, exit_code, data, colours, tmp_path
):
    run_dir = tmp_path / "run"
    run = DdpRun(ddp_colour_run(data, colours, tmp_path, 100), tmp_path, ddp_env(tmp_path))
    ranks = run.ranks()
    sent = signal_ranks_after_epoch_0(run, run_dir, target, signum)
    exits = run.wait(timeout=STOP_BOUND_S + 30)  # a hang fails here, bounded
    for rank, pid in ranks.items():
        assert exits[pid]["code"] == exit_code, (rank, exits[pid], run.stderr())
        assert exits[pid]["exited_at"] - sent < STOP_BOUND_S, rank
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.stat().st_mtime >= sent  # saved again, at the signal
    assert last_step(run_dir) > 6  # after epoch 0 (6 steps per epoch on 2 ranks)
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))
    assert run.stderr().count("preempted: stopped by") == 2  # one line per rank
    if target == "all":
        return
    # Resumed, the stopped epoch ends with every sample seen once, over both ranks.
    stopped = torch.load(last, map_location="cpu", weights_only=False)["epoch"]
    resume = ddp_colour_run(data, colours, tmp_path, max_epochs=stopped + 1)
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *resume],
        capture_output=True,
        text=True,
        env=ddp_env(tmp_path),
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(samples_of_epoch(tmp_path / "samples", stopped)) == list(range(48))


@pytest.mark.slow
def test_a_burst_of_sigterms_ends_the_run_after_its_save_and_its_report(tmp_path):
    """Every 10 ms for 4 s from step 8: Lightning put the default handler back when it tore
    down, and the next SIGTERM of the burst killed the process before the run report."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *SHORT,
            "trainer.max_epochs=3",
            "+callbacks.burst._target_=signal_burst.SignalBurst",
            "+callbacks.burst.step=8",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        env=ddp_env(tmp_path),
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 143, result.stderr[-2000:]  # not -15: killed by the burst
    assert re.search(r"preempted: stopped by SIGTERM at global step (8|9);", result.stderr)
    assert last_step(tmp_path / "run") in (8, 9)  # the batch the burst began in, or the next
    report = json.loads((tmp_path / "run" / "run_report.json").read_text())
    assert report["run"]["status"] == "preempted"


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    io_plugin = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io_plugin.save_checkpoint({"step": 1}, path)

    def killed_mid_write(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt  # a second kill while writing

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io_plugin.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = [*SHORT, "logger=wandb", "trainer.max_epochs=2"]
    with pytest.raises(Preempted):
        run_with(SignalAtStep(3), overrides, tmp_path)
    run_train(overrides, tmp_path)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)


# --- bad data -------------------------------------------------------------------------------
def make_folder_with_bad_files(root: Path) -> list[Path]:
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(8):
                Image.new("RGB", (40, 40), (i * 30, 0, 0)).save(folder / f"{i}.png")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(good, format="JPEG")
    bad = {
        "truncated.JPEG": good.getvalue()[:200],
        "empty.JPEG": b"",
        "notes.JPEG": b"this is not an image\n",
    }
    paths = []
    for name, data in bad.items():
        paths.append(root / "train" / "a" / name)
        paths[-1].write_bytes(data)
    paths.append(root / "train" / "b" / "unreadable.JPEG")
    paths[-1].symlink_to(root / "missing-target.JPEG")  # open() fails, as for a lost mount
    return paths


def test_bad_files_are_replaced_counted_and_named(tmp_path):
    bad = make_folder_with_bad_files(tmp_path / "data")
    overrides = [
        *TINY,
        "data=imagenet",
        f"data.root={tmp_path / 'data'}",
        "data.num_classes=2",
        "data.image_size=32",
        "data.batch_size=4",
        "data.num_workers=2",
        "data.augment.auto_augment=null",
        "trainer.max_epochs=1",
    ]
    with pytest.warns(UserWarning, match="data/bad_samples=4") as warned:
        run_train(overrides, tmp_path / "run")
    message = str(next(w.message for w in warned if "bad_samples" in str(w.message)))
    assert all(str(p) in message for p in bad)
    metrics = (tmp_path / "run" / "csv" / "metrics.csv").read_text()
    assert "data/bad_samples" in metrics.splitlines()[0]

    with pytest.raises(UserError, match=r"cannot read .*\.JPEG.*data.on_bad_sample=skip"):
        run_train(
            [*overrides, "data.on_bad_sample=error", "data.num_workers=0"], tmp_path / "strict"
        )


def test_data_check_lists_the_bad_files(tmp_path, capsys):
    bad = make_folder_with_bad_files(tmp_path)
    assert check_main([str(tmp_path), "--workers", "2"]) == 1
    out, err = capsys.readouterr()
    assert sorted(line.split("\t")[0] for line in out.splitlines()) == sorted(map(str, bad))
    assert "36 image files checked" in err and ": 4 bad" in err


# --- numerical faults, memory, disk ---------------------------------------------------------
class PoisonWeights(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.head.weight.fill_(float("nan"))


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    overrides = [*SHORT, "trainer.max_epochs=3", "faults.check_every_n_steps=4"]
    with pytest.raises(NonFiniteLossError, match="between global steps 6 and 8"):
        run_with(PoisonWeights(7), overrides, tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6  # epoch 0's, written before the fault
    assert all(
        torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()
    )


class NanLoss(torch.nn.Module):
    def __init__(self, criterion: torch.nn.Module) -> None:
        super().__init__()
        self.criterion = criterion

    def forward(self, *args):
        return self.criterion(*args) * float("nan")


class NanLossOnce(Callback):
    """The loss of global step 2 alone is NaN."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2 and not isinstance(pl_module.train_criterion, NanLoss):
            pl_module.train_criterion = NanLoss(pl_module.train_criterion)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if isinstance(pl_module.train_criterion, NanLoss):
            pl_module.train_criterion = pl_module.train_criterion.criterion


def test_nonfinite_loss_step_is_skipped_when_configured(tmp_path):
    overrides = [*SHORT, "trainer.max_epochs=1", "faults.on_nonfinite_loss=skip"]
    run_with(NanLossOnce(), overrides, tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(
        torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()
    )
    metrics = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/nonfinite_steps" in metrics.splitlines()[0]


def test_out_of_memory_names_the_batch_and_the_ways_out(tmp_path, monkeypatch):
    from vitrain.models import ViTClassifier

    def no_memory(self, images):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ViTClassifier, "forward", no_memory)
    with pytest.raises(UserError) as err:
        run_train([*SHORT, "trainer.max_epochs=1", "trainer.num_sanity_val_steps=0"], tmp_path)
    for text in (
        "64 images per device",
        "data.batch_size=32 trainer.accumulate_grad_batches=2",
        "model.grad_checkpointing=true",
    ):
        assert text in str(err.value)


def test_run_directory_not_writable_is_an_error(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="is not writable .* hydra.run.dir="):
        run_train(SHORT, tmp_path / "a-file" / "run")


def test_too_little_disk_for_checkpoints_is_an_error(tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    with pytest.raises(UserError, match=r"has 1.0 kB free, but checkpoints .* need about 1"):
        run_train(SHORT, tmp_path)  # 1000 bytes are 1.0 kB, not "0.00 GB"


FILL_THE_DISK = """
import os, shutil, sys, time
disk = sys.argv[1]
while not os.path.exists(os.path.join(disk, "run", "checkpoints", "last.ckpt")):
    time.sleep(0.05)
free = shutil.disk_usage(disk).free  # leave 300 kB: room for metrics, none for a checkpoint
with open(os.path.join(disk, "filler"), "wb") as handle:
    handle.write(bytes(max(free - 300_000, 0)))
"""


def can_mount_tmpfs() -> bool:
    probe = "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || mount -t tmpfs tmpfs /tmp"
    return shutil.which("unshare") is not None and (
        subprocess.run(["unshare", "-Urm", "sh", "-c", probe], capture_output=True).returncode == 0
    )


@pytest.mark.slow
@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs a tmpfs mount (unshare -Urm)")
def test_a_disk_that_fills_mid_run_is_one_error_and_leaves_the_last_good_checkpoint(tmp_path):
    """A 16 MB tmpfs (in a mount namespace of its own) that another process fills after epoch
    0's checkpoints: epoch 1's save cannot be written."""
    disk = tmp_path / "disk"
    disk.mkdir()
    train = [
        sys.executable,
        str(ROOT / "train.py"),
        *TINY,
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=6",
        "trainer.limit_val_batches=2",
        f"hydra.run.dir={disk}/run",
    ]
    script = (
        f"mount -t tmpfs -o size=16m tmpfs {disk} && "
        f"({sys.executable} -c '{FILL_THE_DISK}' {disk} &) && "
        f"{shlex.join(train)}; code=$?; cp -a {disk}/run {tmp_path}/run; exit $code"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_API")}
    result = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", script],
        capture_output=True,
        text=True,
        env={**env, "VITRAIN_LOG_DIR": str(tmp_path / "logs")},
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: the disk of {disk}/run is full")
    assert "Traceback" not in result.stderr
    run = tmp_path / "run"
    assert last_step(run) == 6  # epoch 0's, whole
    assert not [p.name for p in run.rglob(".*tmp*")]  # no temporary file anywhere


# --- secrets -------------------------------------------------------------------------------
def test_redact_hides_secret_keys_values_and_overrides():
    secret = "wandb-key-0123456789"
    data = {
        "logger": {"api_key": "abc", "note": f"key {secret}"},
        "overrides": ["+x.token=abc123", "model=vit_b16"],
    }
    assert redact(data, [secret]) == {
        "logger": {"api_key": "***", "note": "key ***"},
        "overrides": ["+x.token=***", "model=vit_b16"],
    }


@pytest.mark.slow
def test_credentials_never_reach_any_file_of_the_run(tmp_path):
    secret = "wandb-secret-9f8e7d6c5b4a"
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "WANDB_API_KEY": secret,
        "WANDB_MODE": "offline",
        "VITRAIN_LOG_DIR": str(tmp_path / "logs"),
    }
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "experiment=quickstart",
            "logger=wandb",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            f"hydra.run.dir={run_dir}",
            "+leak=${oc.env:WANDB_API_KEY}",
            "+private.api_key=other-credential-42",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in files) and any(p.suffix == ".wandb" for p in files)
    for path in files:
        data = path.read_bytes()
        assert secret.encode() not in data, path
        assert b"other-credential-42" not in data, path
    assert secret not in result.stdout + result.stderr
