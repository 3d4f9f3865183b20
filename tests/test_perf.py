"""Telemetry: NVML sampling, FLOPs, MFU, epoch timing, input stalls and the run report."""

import json
import time

import lightning.pytorch as pl
import pytest
import torch
from conftest import ROOT, TINY, run_train
from torch.utils.data import DataLoader, Dataset

from vitrain.data.batch import Batch, collate_samples
from vitrain.perf import SpeedMonitor
from vitrain.perf.environment import git_state
from vitrain.perf.flops import training_flops_per_image
from vitrain.perf.nvml import NvmlSampler, Sample
from vitrain.perf.peaks import GPU_PEAK_TFLOPS, mfu, peak_flops
from vitrain.report.run_report import summarize


class FakeReader:
    def __init__(self, samples):
        self.samples = list(samples)

    def __call__(self) -> Sample:
        return self.samples.pop(0)


def test_nvml_sampler_averages_util_and_power_and_keeps_peak_memory():
    sampler = NvmlSampler(
        FakeReader([Sample(90, 10e9, 300), Sample(100, 30e9, 500), Sample(50, 20e9, 100)])
    )
    for _ in range(3):
        sampler.sample_once()
    assert sampler.window() == pytest.approx(
        {"gpu_util": 80.0, "gpu_mem_gb": 30.0, "gpu_power_w": 300.0}
    )
    assert sampler.window() is None  # each window starts empty


def test_nvml_sampler_thread_samples_at_its_interval_and_pauses():
    reader = FakeReader([Sample(100, 1e9, 100)] * 1000)
    sampler = NvmlSampler(reader, interval_s=0.01)
    sampler.start()
    time.sleep(0.3)
    sampler.pause()
    first = sampler.window()
    time.sleep(0.1)
    paused = sampler.window()
    sampler.stop()
    assert first is not None and first["gpu_util"] == 100.0
    assert paused is None


def test_vit_b16_training_flops_per_image_match_the_published_count():
    # 17.58 GMAC forward, x2 FLOP per MAC, x3 for forward + backward
    flops = training_flops_per_image(
        {"name": "vit_base_patch16_224", "patch_size": 16, "img_size": 224, "num_classes": 1000}
    )
    assert flops == pytest.approx(3 * 17.58e9 * 2, rel=0.05)


def test_mfu_against_a_hand_computation():
    # 105.5 GFLOP x 3,700 images/s on one H100 SXM at bf16 (989.4 TFLOP/s dense)
    peak = peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed")
    assert peak == 989.4e12
    assert mfu(105.5e9, 3700.0, peak, 1) == pytest.approx(0.39453, rel=1e-4)
    # 8 A100s at fp16, 8 x 763 images/s
    assert mfu(105.5e9, 6104.0, peak_flops("NVIDIA A100-SXM4-80GB", "16-mixed"), 8) == (
        pytest.approx(105.5e9 * 6104 / (8 * 312e12))
    )


def test_peak_table_covers_the_common_gpus_and_not_cpus():
    names = [name for name, _ in GPU_PEAK_TFLOPS]
    for gpu in ("V100", "A10", "A100", "L4", "L40S", "H100 PCIe", "H100", "H200", "RTX 4090"):
        assert gpu in names
    assert peak_flops("NVIDIA H100 PCIe", "bf16-mixed") == 756.5e12
    assert peak_flops("Tesla V100-SXM2-16GB", "bf16-mixed") is None  # no bf16 units
    assert peak_flops("cpu", "32-true") is None


def test_summary_uses_the_epochs_after_the_first():
    epochs = [
        {
            "perf/epoch_time_s": 10.0,
            "perf/images_per_s": 50.0,
            "epoch_wall_s": 12.0,
            "val/acc1": 0.2,
        },
        {
            "perf/epoch_time_s": 4.0,
            "perf/images_per_s": 100.0,
            "epoch_wall_s": 5.0,
            "val/acc1": 0.5,
        },
        {"perf/epoch_time_s": 6.0, "perf/images_per_s": 80.0, "epoch_wall_s": 7.0, "val/acc1": 0.4},
    ]
    summary = summarize(epochs, max_epochs=10, wall_time_s=30.0)
    assert summary["epoch_time_s"] == 5.0 and summary["images_per_s"] == 90.0
    assert summary["best_val_acc1"] == 0.5
    assert "gpu_util" not in summary and "mfu" not in summary  # absent, not zero, without a GPU
    # 6 s of overhead + the first epoch + 9 more at the median of the later ones
    assert summary["projected_wall_time_s"] == pytest.approx(6.0 + 12.0 + 9 * 6.0)


class SlowImages(Dataset):
    def __init__(self, n: int, delay_s: float, replaced: tuple[str, ...] = ()) -> None:
        self.n, self.delay_s, self.replaced = n, delay_s, replaced

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        time.sleep(self.delay_s)
        return torch.randn(8), i % 2, self.replaced


class SlowValidation(pl.LightningModule):
    def __init__(self, val_sleep_s: float) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 2)
        self.val_sleep_s = val_sleep_s

    def training_step(self, batch: Batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.layer(batch.images), batch.targets)

    def validation_step(self, batch, batch_idx):
        time.sleep(self.val_sleep_s)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SlowFirstStep(SlowValidation):
    """Its first training step takes 0.5 s longer, as a compiling one does."""

    def training_step(self, batch, batch_idx):
        if self.global_step == 0:
            time.sleep(0.5)
        return super().training_step(batch, batch_idx)


def fit_with_monitor(
    train_delay_s: float,
    val_sleep_s: float,
    module: type = SlowValidation,
    replaced: tuple[str, ...] = (),
) -> SpeedMonitor:
    monitor = SpeedMonitor(data_wait_warning=0.3)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(
        module(val_sleep_s),
        DataLoader(
            SlowImages(40, train_delay_s, replaced), batch_size=4, collate_fn=collate_samples
        ),
        DataLoader(SlowImages(8, 0.0), batch_size=4, collate_fn=collate_samples),
    )
    return monitor


def test_epoch_time_excludes_validation_and_images_per_s_counts_images():
    monitor = fit_with_monitor(train_delay_s=0.0, val_sleep_s=0.5)  # 1 s of validation
    for epoch in monitor.history:
        # 2 validation batches of 0.5 s each are in the epoch's wall time, not in its epoch time
        assert epoch["epoch_wall_s"] - epoch["perf/epoch_time_s"] >= 0.99
        assert epoch["perf/images_per_s"] * epoch["perf/epoch_time_s"] == pytest.approx(40)
        assert not any(k.startswith("perf/gpu") for k in epoch)  # no GPU here: absent, not 0


def test_first_step_time_is_logged_once_with_the_first_epoch():
    monitor = fit_with_monitor(train_delay_s=0.0, val_sleep_s=0.0, module=SlowFirstStep)
    first, second = monitor.history
    assert 0.5 <= first["perf/first_step_s"] < first["perf/epoch_time_s"]
    assert "perf/first_step_s" not in second
    # The median step hides the slow first step; first_step_s is where it shows.
    assert first["perf/step_time_ms"] < 500
    assert summarize(monitor.history, 2, 10.0)["first_step_s"] == first["perf/first_step_s"]


def test_data_wait_frac_shows_an_input_bound_loop_and_warns():
    with pytest.warns(UserWarning, match=r"perf/data_wait_frac=0\.\d+: .* input-bound"):
        # 100 ms of input per batch: far above the tiny model's step even on a loaded 2-core CPU
        monitor = fit_with_monitor(train_delay_s=0.025, val_sleep_s=0.0)
    assert all(e["perf/data_wait_frac"] > 0.7 for e in monitor.history)
    assert monitor.history[-1]["perf/step_time_ms"] >= 100.0
    # The run's total wait (what StepProfiler reads for its window) is the epochs' waits summed.
    waits = [e["perf/data_wait_frac"] * e["perf/epoch_time_s"] for e in monitor.history]
    assert monitor.data_wait_s == pytest.approx(sum(waits))


def test_git_state_of_a_checkout_and_of_an_image(tmp_path, monkeypatch):
    monkeypatch.setenv("VITRAIN_GIT_COMMIT", "0123abc")
    here = git_state(str(ROOT))  # a checkout wins over the variable
    assert here["git_commit"] != "0123abc" and isinstance(here["git_dirty"], bool)
    # No .git (an image's copied source): the commit the image was built from, dirtiness unknown.
    assert git_state(str(tmp_path)) == {"git_commit": "0123abc", "git_dirty": None}
    monkeypatch.setenv("VITRAIN_GIT_COMMIT", "")
    assert git_state(str(tmp_path)) == {"git_commit": None, "git_dirty": None}


def test_run_report_of_a_real_run(quickstart_run):
    report = json.loads((quickstart_run / "run_report.json").read_text())
    config, env, summary = report["config"], report["environment"], report["summary"]
    assert config["params"] == 311_338 and config["image_size"] == 32
    assert config["precision"] == "32-true" and config["global_batch"] == 64
    assert config["strategy"] == "SingleDeviceStrategy" and config["devices"] == 1
    assert config["container"] in ("host", "pip", "ngc", "other")
    for key in ("python", "torch", "lightning", "timm", "hostname", "cpu_count", "git_commit"):
        assert key in env
    assert env["gpus"] == [] and env["container"]["kind"] == config["container"]
    assert len(report["epochs"]) == summary["epochs_run"] == 6
    assert summary["best_val_acc1"] == max(e["val/acc1"] for e in report["epochs"])
    assert summary["images_per_s"] > 0 and "mfu" not in summary
    assert summary["first_step_s"] == report["epochs"][0]["perf/first_step_s"] > 0
    assert report["run"]["status"] == "finished"


def test_run_summary_is_printed(tmp_path, capsys):
    run_train(
        [
            *TINY,
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=3",
            "trainer.limit_val_batches=1",
            "logger=none",
        ],
        tmp_path,
    )
    out = capsys.readouterr()
    text = out.out + out.err
    assert "images/s" in text and "epoch time (median)" in text
    assert str(tmp_path / "run_report.json") in text


def test_image_count_is_the_batch_images_not_the_bad_file_names(recwarn):
    """Every sample here names two files it replaced: SpeedMonitor counts images, never those
    strings (Lightning's extract_batch_size, never asked, would count them and warn)."""
    monitor = fit_with_monitor(train_delay_s=0.0, val_sleep_s=0.0, replaced=("a.JPEG", "b.JPEG"))
    for epoch in monitor.history:
        assert epoch["perf/images_per_s"] * epoch["perf/epoch_time_s"] == pytest.approx(40)
    assert not [w for w in recwarn if "ambiguous" in str(w.message)]
