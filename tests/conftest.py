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


def compose_config(
    overrides: list[str], output_dir: Path | None = None, name: str = "train"
) -> DictConfig:
    """The config `python <name>.py <overrides>` would get, with its run directory at output_dir."""
    return vitrain_config.compose_config(ROOT / "conf", overrides, output_dir, name)


def run_train(overrides: list[str], output_dir: Path, callbacks=()) -> dict:
    """vitrain.train.train in this process (no DDP launch here: that needs train.py), with
    `callbacks` (probes) before the configured ones."""
    from vitrain.train import train

    return train(compose_config(overrides, output_dir), callbacks=callbacks)


def run_cli(
    args: list[str],
    tmp_path: Path,
    timeout: int = 600,
    env: dict | None = None,
    script: str = "train.py",
):
    """`python <script> <args>` (train.py, eval.py) with logs under tmp_path; returns the
    CompletedProcess."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_API")}
    child_env.update({"VITRAIN_LOG_DIR": str(tmp_path / "logs"), "PYTHONUNBUFFERED": "1"})
    child_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
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


# A run on the CPU with only what every run has: no logger, checkpoints or progress bar.
BARE_CPU = [
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "callbacks=base",
]

# A real tiny CPU run on synthetic batches (add data.batch_size): the runs reports are made of.
REAL_RUN = [
    "experiment=quickstart",
    "data=synthetic",
    "data.image_size=32",
    "data.num_classes=10",
    "data.train_batches=8",
    "data.val_batches=1",
    "trainer.max_epochs=2",
    *BARE_CPU,
]


@pytest.fixture(scope="session")
def ema_run(tmp_path_factory) -> tuple[Path, dict]:
    """A short real run with EMA weights (recipe.ema): its directory, whose last.ckpt holds the
    average and the raw weights, and its final metrics (validation sees the average)."""
    out = tmp_path_factory.mktemp("ema_run")
    metrics = run_train(
        [
            *TINY,
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=4",
            "recipe.ema=true",
            "recipe.ema_decay=0.9",
        ],
        out,
    )
    return out, metrics


@pytest.fixture(scope="session")
def real_runs(tmp_path_factory) -> Path:
    """Two real tiny CPU runs that differ only in the global batch: reports to compare."""
    root = tmp_path_factory.mktemp("real_runs")
    for batch in (16, 32):
        run_train([*REAL_RUN, f"data.batch_size={batch}"], root / f"batch{batch}")
    return root


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory) -> Path:
    """REAL_RUN on 2 CPU processes (strategy=ddp_cpu), global batch 32, training batches 2-3
    profiled (in the first epoch, which the report's images/s leave out): its run directory."""
    root = tmp_path_factory.mktemp("ddp_run")
    args = [*REAL_RUN, "data.batch_size=32", "strategy=ddp_cpu", "perf.profile_steps=[2,4]"]
    result = run_cli([*args, f"hydra.run.dir={root / 'ddp'}"], root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "ddp"
