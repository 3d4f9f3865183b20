"""Evaluating a checkpoint on its own: `python eval.py ckpt_path=<file>` and vitrain.evaluate."""

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_config, run_cli
from safetensors.torch import save_file

from vitrain.errors import UserError
from vitrain.evaluate import evaluate

QUICK = [
    "data=digits",
    "trainer.enable_progress_bar=false",
    "speed.warmup_batches=1",
    "speed.batches=2",
    "speed.latency_runs=5",
]


# digits' facts, read as a plain ImageFolder (data=digits would write the whole data set there)
FOLDER = [
    "data._target_=vitrain.data.ImageFolderDataModule",
    "~data.val_fraction",
    "~data.split_seed",
]
DIGITS = [str(d) for d in range(10)]


def run_eval(overrides: list[str], output_dir) -> dict[str, float]:
    return evaluate(compose_config(overrides, output_dir, name="eval"))


def val_only(root: Path, digits_root: Path, names: dict[str, str] | None = None) -> Path:
    """root/val/ alone, its class folders links to the digits' val/ folders (renamed by
    `names`: {digit: folder name})."""
    (root / "val").mkdir(parents=True)
    for digit in DIGITS:
        (root / "val" / (names or {}).get(digit, digit)).symlink_to(digits_root / "val" / digit)
    return root


def test_eval_reports_the_accuracy_training_validated(ema_run, tmp_path, capsys):
    """The EMA weights of the run's last checkpoint, on the data its last validation saw."""
    run_dir, trained = ema_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    metrics = run_eval([f"ckpt_path={ckpt}", *QUICK], tmp_path)
    assert metrics["val/acc1"] == trained["val/acc1"]
    assert metrics["val/acc5"] == trained["val/acc5"]
    assert metrics["val/loss"] == pytest.approx(trained["val/loss"], rel=1e-5)
    assert f"ckpt_path={ckpt}: vitrain checkpoint, EMA weights" in capsys.readouterr().out

    report = json.loads((tmp_path / "eval_report.json").read_text())
    run_report = json.loads((run_dir / "run_report.json").read_text())
    assert report["environment"].keys() == run_report["environment"].keys()
    assert report["checkpoint"] == {
        "path": str(ckpt),
        "run_dir": str(run_dir),
        "epoch": 1,
        "global_step": 8,
        "weights": "vitrain checkpoint, EMA weights",
        "resampled": [],
    }
    assert report["metrics"] == {**metrics, "images": 360}  # digits: 1,797 x 0.2 for val
    assert report["config"]["image_size"] == report["config"]["trained_image_size"] == 32
    speed = report["speed"]
    assert (speed["batch_size"], speed["timed_batches"], speed["latency_runs"]) == (64, 2, 5)
    assert speed["images_per_s"] > 0 and speed["device"] == "cpu"
    assert 0 < speed["latency_ms_p50"] <= speed["latency_ms_p95"]


def test_eval_raw_weights_at_another_image_size(ema_run, tmp_path, capsys):
    ckpt = ema_run[0] / "checkpoints" / "last.ckpt"
    metrics = run_eval([f"ckpt_path={ckpt}", *QUICK, "ema=false", "data.image_size=40"], tmp_path)
    printed = capsys.readouterr().out
    assert f"ckpt_path={ckpt}: vitrain checkpoint, raw weights" in printed
    assert "  resampled       pos_embed [1, 65, 96] -> [1, 101, 96]" in printed
    assert 0.0 <= metrics["val/acc1"] <= metrics["val/acc5"] <= 1.0
    report = json.loads((tmp_path / "eval_report.json").read_text())
    assert (report["config"]["image_size"], report["config"]["trained_image_size"]) == (40, 32)
    assert report["checkpoint"]["resampled"] == ["pos_embed"]


def test_eval_refuses_what_it_cannot_evaluate(ema_run, tmp_path):
    ckpt = ema_run[0] / "checkpoints" / "last.ckpt"
    with pytest.raises(UserError, match=r"^ckpt_path must be given for this run"):
        run_eval(QUICK, tmp_path)
    save_file({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    with pytest.raises(UserError, match="is not a checkpoint of a vitrain run"):
        run_eval([f"ckpt_path={tmp_path / 'w.safetensors'}", *QUICK], tmp_path)
    with pytest.raises(UserError, match="classifies 10 classes"):
        run_eval([f"ckpt_path={ckpt}", *QUICK, "data.num_classes=5"], tmp_path)
    with pytest.raises(UserError, match="pytorch issue 135892"):
        run_eval([f"ckpt_path={ckpt}", *QUICK, "runtime.compile=reduce-overhead"], tmp_path)


@pytest.mark.slow
def test_eval_cli_under_ddp_reduces_over_both_ranks(ema_run, tmp_path):
    """`python eval.py` on 2 gloo processes: each validates half the images, the metrics are
    reduced over both and equal the single-process ones."""
    run_dir, trained = ema_run
    out = tmp_path / "eval"
    result = run_cli(
        [
            f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
            *QUICK,
            "strategy=ddp_cpu",
            f"hydra.run.dir={out}",
        ],
        tmp_path,
        script="eval.py",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "eval_report.json").read_text())  # rank 0 alone writes it
    assert report["config"]["strategy"] == "DDPStrategy" and report["config"]["devices"] == 2
    assert report["config"]["per_device_batch"] == 32 and report["speed"]["batch_size"] == 32
    assert report["metrics"]["images"] == 360
    assert report["metrics"]["val/acc1"] == pytest.approx(trained["val/acc1"], abs=1e-6)
    assert report["metrics"]["val/loss"] == pytest.approx(trained["val/loss"], rel=1e-5)
    assert result.stdout.count("  loaded          56 tensors") == 1  # printed by rank 0 alone


def test_eval_reads_val_alone_with_the_class_names_the_checkpoint_records(ema_run, tmp_path):
    run_dir, trained = ema_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert checkpoint["datamodule_hyper_parameters"]["classes"] == DIGITS  # train/'s, sorted
    digits_root = Path(compose_config([f"ckpt_path={ckpt}", *QUICK], name="eval").data.root)

    root = val_only(tmp_path / "val_only", digits_root)
    metrics = run_eval([f"ckpt_path={ckpt}", *QUICK, *FOLDER, f"data.root={root}"], tmp_path)
    assert metrics["val/acc1"] == trained["val/acc1"]  # the same images, the same labels

    swapped = val_only(tmp_path / "renamed", digits_root, {"9": "nine"})
    with pytest.raises(UserError) as err:
        run_eval([f"ckpt_path={ckpt}", *QUICK, *FOLDER, f"data.root={swapped}"], tmp_path)
    assert str(err.value).startswith(
        f"{swapped}/val has other class folders than data.classes, the 10 class names the model "
        "was trained on (eval.py reads them from its checkpoint) (only in data.classes: 9; only "
        "in val: nine): a class's index is its place in data.classes"
    )


def test_a_checkpoint_without_class_names_still_needs_train(ema_run, tmp_path):
    """One written before runs recorded their class names: train/'s folders name them."""
    ckpt = ema_run[0] / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    del checkpoint["datamodule_hyper_parameters"]["classes"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    old = [f"ckpt_path={tmp_path / 'old.ckpt'}", *QUICK]
    digits_root = Path(compose_config(old, name="eval").data.root)
    root = val_only(tmp_path / "val_only", digits_root)
    with pytest.raises(UserError) as err:
        run_eval([*old, *FOLDER, f"data.root={root}"], tmp_path)
    message = str(err.value)
    assert message.startswith(f"data.root={root}: {root}/train does not exist")
    assert "ckpt_path records no class names (a checkpoint written before runs" in message
    assert message.endswith("or give data.classes=[...] (those folder names, sorted).")
    metrics = run_eval([*old, "speed.batches=0", "speed.latency_runs=0"], tmp_path)
    assert metrics["val/acc1"] == ema_run[1]["val/acc1"]  # with train/, as before
