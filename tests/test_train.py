"""Real training runs in-process on CPU: every model, learning, checkpoints and resume."""

import copy
import json
import logging
import time

import pytest
import torch
from conftest import TINY, run_train
from lightning.pytorch import Callback

from vitrain.errors import UserError

MODELS = ["vit_micro", "vit_ti16", "vit_s16", "vit_b16", "vit_b32", "vit_l16"]


@pytest.mark.parametrize("model", MODELS)
def test_fast_dev_run_for_each_model(model, tmp_path):
    metrics = run_train(
        [
            f"model={model}",
            "data=synthetic",
            "data.image_size=32",
            "data.num_classes=10",
            "data.batch_size=4",
            "trainer.accelerator=cpu",
            "debug=fast_dev_run",
        ],
        tmp_path,
    )
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert 0.0 <= metrics["val/acc1"] <= 1.0


def test_quickstart_learns_well_above_chance(quickstart_run):
    report = json.loads((quickstart_run / "run_report.json").read_text())
    epochs = report["epochs"]
    assert len(epochs) == 6
    assert report["config"]["model"] == "vit_micro" and report["config"]["data"] == "digits"
    assert max(e["val/acc1"] for e in epochs) >= 0.25  # 10 classes: chance is 0.10
    assert epochs[-1]["train/loss_epoch"] < epochs[0]["train/loss_epoch"] - 0.2


def test_checkpoints_best_by_acc1_and_last(quickstart_run):
    files = {p.name for p in (quickstart_run / "checkpoints").glob("*.ckpt")}
    assert "last.ckpt" in files
    best = [f for f in files if f.startswith("epoch")]
    assert len(best) == 1 and "acc1_" in best[0]
    ckpt = torch.load(
        quickstart_run / "checkpoints" / best[0], map_location="cpu", weights_only=False
    )
    report = json.loads((quickstart_run / "run_report.json").read_text())
    assert ckpt["epoch"] == max(report["epochs"], key=lambda e: e["val/acc1"])["epoch"]


def test_csv_logger_gets_metrics_and_learning_rate(quickstart_run):
    header = (quickstart_run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("train/loss", "val/loss", "val/acc1", "val/acc5", "perf/images_per_s"):
        assert key in header
    assert any(h.startswith("lr-") for h in header)


class RecordResumeState(Callback):
    def on_train_start(self, trainer, pl_module):
        self.global_step = trainer.global_step
        self.epoch = trainer.current_epoch
        self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())  # live tensors
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]


def test_resume_continues_at_the_same_step_with_the_same_optimizer_state(quickstart_run, tmp_path):
    """Resume the 6-epoch run from its checkpoint and train a 7th epoch."""
    last = quickstart_run / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    recorder = RecordResumeState()
    run_train([*TINY, "trainer.max_epochs=7", f"ckpt_path={last}"], tmp_path, [recorder])
    assert recorder.global_step == saved["global_step"] > 0
    assert recorder.epoch == saved["epoch"] + 1
    saved_state = saved["optimizer_states"][0]["state"]
    for index, state in recorder.optimizer["state"].items():
        assert torch.equal(state["exp_avg"], saved_state[index]["exp_avg"])
        assert state["step"] == saved_state[index]["step"]
    report = json.loads((tmp_path / "run_report.json").read_text())
    # The history travels with the checkpoint: the report covers the whole run, not the attempt.
    assert [e["epoch"] for e in report["epochs"]] == list(range(7))
    per_epoch = saved["global_step"] // 6
    assert report["epochs"][-1]["global_step"] == saved["global_step"] + per_epoch


WANDB_SHORT = [
    "experiment=quickstart",
    "logger=wandb",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "logger.wandb.settings.init_timeout=2",
]


def test_wandb_offline_run_without_a_key(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    run_train(WANDB_SHORT, tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # An offline run keeps its config and metrics in the .wandb record file until `wandb sync`.
    record_file = next(runs[0].glob("run-*.wandb"))
    deadline = time.monotonic() + 60  # wandb-core may still be flushing after finish()
    while b"val/acc1" not in record_file.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)
    records = record_file.read_bytes()
    for text in (b"vit_tiny_patch16_224", b"nvml_interval_s", b"container_detected", b"val/acc1"):
        assert text in records  # the full resolved config, and the metrics
    assert f"wandb sync {runs[0]}" in capsys.readouterr().out


def test_wandb_with_a_key_but_no_server_logs_offline_and_trains(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: no server
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with caplog.at_level(logging.WARNING, logger="vitrain"):
        metrics = run_train(WANDB_SHORT, tmp_path)
    (warning,) = [r.getMessage() for r in caplog.records if r.name.startswith("vitrain")]
    assert "cannot reach its server" in warning and "wandb sync" in warning
    assert "0123456789abcdef" not in warning
    assert "val/acc1" in metrics  # it trained
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert len(runs) == 1 and runs[0].name.endswith(run_id)


def test_wandb_with_a_malformed_key_is_one_error_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "not-a-key")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(UserError, match="wandb refused WANDB_API_KEY .* logger.wandb.mode=offline"):
        run_train(WANDB_SHORT, tmp_path)
    assert not (tmp_path / "checkpoints").exists()
