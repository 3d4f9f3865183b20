"""`python train.py` as users run it: DDP on 2 CPU processes and Hydra multirun sweeps."""

import json
import subprocess
import sys

import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow
SHORT = [
    "experiment=quickstart",
    "logger=csv",
    "trainer.max_epochs=1",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
]


def reports_under(path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(path.rglob("run_report.json"))]


def test_ddp_on_two_cpu_processes(tmp_path):
    result = run_cli(
        [*SHORT, "strategy=ddp_cpu", "hydra.run.dir=" + str(tmp_path / "run")], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (report,) = reports_under(tmp_path / "run")  # rank 0 alone writes it
    assert report["config"]["strategy"] == "DDPStrategy"
    assert report["config"]["devices"] == 2 and report["config"]["per_device_batch"] == 32
    epoch = report["epochs"][0]
    # images/s counts both ranks: 2 x 22 steps x 32 images (digits: 1,437 train images)
    assert epoch["perf/images_per_s"] * epoch["perf/epoch_time_s"] == pytest.approx(1408)
    assert epoch["perf/images_per_s_per_device"] == pytest.approx(epoch["perf/images_per_s"] / 2)


def test_multirun_runs_each_job_in_its_own_directory(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        ["-m", *SHORT, "trainer.precision=32-true,bf16-mixed", f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = reports_under(sweep)
    assert [r["config"]["precision"] for r in reports] == ["32-true", "bf16-mixed"]
    assert [r["run"]["output_dir"] for r in reports] == [str(sweep / "0"), str(sweep / "1")]


def test_multirun_with_ddp_keeps_the_children_in_their_job(tmp_path):
    """Lightning re-launches sys.argv for DDP ranks (issue 11300): no child may start a sweep."""
    sweep = tmp_path / "sweep"
    result = run_cli(
        ["-m", *SHORT, "strategy=ddp_cpu", "seed=1,2", f"hydra.sweep.dir={sweep}"], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = reports_under(tmp_path)
    assert [(r["config"]["seed"], r["config"]["devices"]) for r in reports] == [(1, 2), (2, 2)]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert not (tmp_path / "logs").exists()  # no stray runs or sweeps elsewhere


def test_speed_experiment_sweep_compares_settings_without_data(tmp_path):
    """experiment=speed: synthetic batches, no validation, no checkpoints; the report tables it."""
    sweep = tmp_path / "sweep"
    result = run_cli(
        [
            "-m",
            "experiment=speed",
            "model=vit_micro",
            "data.image_size=32",
            "data.batch_size=32",
            "data.train_batches=4",
            "trainer.accelerator=cpu",
            "trainer.precision=32-true,bf16-mixed",
            "trainer.enable_progress_bar=false",
            "logger=csv",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = reports_under(sweep)
    assert [r["config"]["precision"] for r in reports] == ["32-true", "bf16-mixed"]
    for r in reports:
        assert r["config"]["data"] == "synthetic" and r["config"]["tags"] == ["speed"]
        assert r["summary"]["epochs_run"] == 3 and r["summary"].get("best_val_acc1") is None
        assert r["summary"]["first_step_s"] > 0 and r["summary"]["images_per_s"] > 0
        assert not any("val/acc1" in e for e in r["epochs"])  # no validation
    assert not list(sweep.rglob("*.ckpt"))
    table = subprocess.run(
        [sys.executable, "-m", "vitrain.report", str(sweep), "--baseline", "precision=32-true"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [line for line in table.splitlines() if line.startswith(("| 32-true", "| bf16-mixed"))]
    assert len(rows) == 2 and rows[0].endswith("| 1.00x |")
    assert "first step (s)" in table
