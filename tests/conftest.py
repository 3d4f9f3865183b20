"""Shared helpers: compose the real config, run training in-process or as `python train.py`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("VITRAIN_ROOT", str(ROOT))
os.environ.setdefault("WANDB_SILENT", "true")

from vitrain import config as vitrain_config  # noqa: E402

vitrain_config.register_configs()

# Small, fast and still the real code path: vit_micro on the real digits ImageFolder.
TINY = ["experiment=quickstart", "logger=csv", "trainer.enable_progress_bar=false"]

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def compose_config(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """The config `python train.py <overrides>` would get, with its run directory at output_dir."""
    return vitrain_config.compose_config(ROOT / "conf", overrides, output_dir)


def run_train(overrides: list[str], output_dir: Path, callbacks=()) -> dict:
    """vitrain.train.train in this process (no DDP launch here: that needs train.py), with
    `callbacks` (probes) before the configured ones."""
    from vitrain.train import train

    return train(compose_config(overrides, output_dir), callbacks=callbacks)


def run_cli(args: list[str], tmp_path: Path, timeout: int = 600, env: dict | None = None):
    """`python train.py <args>` with logs under tmp_path; returns the CompletedProcess."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_API")}
    child_env.update({"VITRAIN_LOG_DIR": str(tmp_path / "logs"), "PYTHONUNBUFFERED": "1"})
    child_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env,
        cwd=tmp_path,  # nothing may depend on the current directory
    )


@pytest.fixture(scope="session")
def colours(tmp_path_factory) -> Path:
    """A folder of one-colour images numbered by their colour (sample_recorder), as an
    ImageFolder (`folder/`) and as tar shards (`shards/`)."""
    from sample_recorder import colour_folder

    from vitrain.data.write_shards import convert

    root = tmp_path_factory.mktemp("colours")
    convert(colour_folder(root / "folder"), root / "shards", shard_size=10)
    return root


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> Path:
    """One short real quickstart run (CSV logger) shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("quickstart")
    run_train([*TINY, "trainer.max_epochs=6"], out)
    return out


@pytest.fixture(scope="session")
def real_runs(tmp_path_factory) -> Path:
    """Two real tiny CPU runs that differ only in the global batch: reports to compare."""
    root = tmp_path_factory.mktemp("real_runs")
    for batch in (16, 32):
        run_train(
            [
                "experiment=quickstart",
                "data=synthetic",
                "data.image_size=32",
                "data.num_classes=10",
                f"data.batch_size={batch}",
                "data.train_batches=8",
                "data.val_batches=1",
                "trainer.max_epochs=2",
                "trainer.accelerator=cpu",
                "logger=none",
                "callbacks=base",
                "trainer.enable_progress_bar=false",
            ],
            root / f"batch{batch}",
        )
    return root
